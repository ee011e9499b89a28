"""One launch per run directory: RUN_DIR/LOCK (RunDir.lock) names the launch that holds it.

Two `stepc run`s, stage scripts or SLURM jobs training the same run directory would both write
checkpoints, metrics and exports into it. The first takes RUN_DIR/LOCK before it writes anything;
every other launch exits 2 naming the holder (host, PID, SLURM job, command, since when).

- Works across nodes on a shared filesystem: the record is written to a private temp file and
  published with link(2), which is atomic and fails when LOCK exists, also on NFS (where O_EXCL
  creation was historically not atomic); LOCK is never seen half-written.
- One holder, many processes: the taker exports STEPC_RUN_LOCK=<owner> to its children (`stepc run`
  -> stage scripts), and in a SLURM job the owner is the job id, so every node and rank of that job
  (and the job's requeued incarnations) are the same holder.
- A stale lock is taken over with a warning: its holder ran on this host and that PID is gone (or is
  another process now: the recorded start time differs), or it was a SLURM job that `squeue` no
  longer lists as running.

Not rundir.atomic_write: its rename replaces an existing file, a lock must fail when one exists.
Hand-written: filelock/fcntl locks are per host (flock does not cross NFS clients reliably) and
record no holder to name in the refusal.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from stepc.errors import UserError
from stepc.rundir import RunDir

LOCK = RunDir(Path(".")).lock.name
ENV = "STEPC_RUN_LOCK"
_LIVE_JOB_STATES = {"RUNNING", "COMPLETING", "CONFIGURING", "SUSPENDED", "STOPPED", "SIGNALING", "STAGE_OUT"}


class LockHeld(UserError):
    """Another launch holds the run directory (exit code 2)."""


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (/proc/PID/stat field 22): tells a
    recycled PID from the original holder. None when the process does not exist."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            return ""
        return ""  # alive, start time unknown (no /proc)
    fields = stat.rsplit(")", 1)[1].split()
    if fields[0] in ("Z", "X"):
        return None
    return fields[19]


def owner_key(job_id: str | None, host: str, pid: int) -> str:
    return f"slurm-job-{job_id}" if job_id else f"{host}:{pid}"


def describe(holder: dict) -> str:
    who = f"SLURM job {holder['job_id']}" if holder.get("job_id") else holder.get("command") or "a launch"
    return (f"{who} (pid {holder.get('pid')} on {holder.get('host')}, since "
            f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(holder.get('since', 0)))})")


def read(run_dir: Path) -> dict | None:
    try:
        return json.loads(RunDir(Path(run_dir)).lock.read_text())
    except (OSError, ValueError):
        return None


def _stale(holder: dict) -> str | None:
    """Why the holder is gone, or None while it may still be running."""
    host, pid = holder.get("host"), holder.get("pid")
    if host == socket.gethostname() and isinstance(pid, int):
        now = _start_time(pid)
        if now is None:
            return f"process {pid} on {host} is gone"
        if holder.get("start") and now and now != holder["start"]:
            return f"PID {pid} on {host} is another process now"
        return None
    job = holder.get("job_id")
    if job:
        try:
            out = subprocess.run(["squeue", "-h", "-j", str(job), "-o", "%T"], capture_output=True, text=True,
                                 timeout=20, stdin=subprocess.DEVNULL)
        except (OSError, subprocess.TimeoutExpired):
            return None
        states = set(out.stdout.split())
        if out.returncode == 0 and not states & _LIVE_JOB_STATES:
            return f"SLURM job {job} is not running ({', '.join(sorted(states)) or 'gone from squeue'})"
        if out.returncode != 0 and "Invalid job id" in out.stderr:
            return f"SLURM job {job} is gone"
    return None


def acquire(run_dir: Path, pid: int | None = None, command: str = "") -> dict | None:
    """Take RUN_DIR/LOCK for the process `pid` (default: this one) before anything is written.

    Returns the record written (pass it to `release`), or None when a parent launch of the same
    owner already holds it (STEPC_RUN_LOCK, or the same SLURM job). Raises LockHeld (exit 2)."""
    run_dir = Path(run_dir)
    pid = os.getpid() if pid is None else pid
    host, job = socket.gethostname(), os.environ.get("SLURM_JOB_ID") or None
    record = {"owner": owner_key(job, host, pid), "host": host, "pid": pid, "start": _start_time(pid) or "",
              "job_id": job, "command": command, "since": round(time.time(), 3)}
    path = RunDir(run_dir).lock
    inherited = os.environ.get(ENV)
    tmp = run_dir / f".{LOCK}.{host}.{os.getpid()}"
    for _ in range(50):
        holder = read(run_dir)
        if holder is not None and (holder.get("owner") in (inherited, record["owner"])):
            return None  # our own launch (parent process, another node or a requeue of this job)
        if holder is not None:
            reason = _stale(holder)
            if reason is None:
                raise LockHeld(f"another launch is training this run directory: {describe(holder)}",
                               file=str(path),
                               fix=f"wait for it to finish, or stop it ({_how_to_stop(holder)}); a lock whose "
                                   "holder is gone is taken over automatically")
            aside = path.with_name(f"{LOCK}.stale.{host}.{os.getpid()}")
            try:
                os.rename(path, aside)
            except FileNotFoundError:
                continue  # someone else moved it first
            taken = read_file(aside)
            os.unlink(aside)
            if taken != holder:  # it changed between our read and our rename: put it back, look again
                _publish(path, taken)
                continue
            print(f"warning: taking over the stale lock {path} of {describe(holder)}: {reason}", file=sys.stderr)
        try:
            tmp.write_text(json.dumps(record, indent=1) + "\n")
            try:
                os.link(tmp, path)  # atomic; fails if LOCK exists
            except FileExistsError:
                time.sleep(0.02)
                continue
            finally:
                tmp.unlink(missing_ok=True)
        except OSError as exc:
            raise UserError(f"cannot create the lock file {path}: {exc}", file=str(run_dir),
                            fix="make the run directory writable") from None
        return record  # the caller exports ENV=record["owner"] to its children (they are this launch)
    raise LockHeld(f"could not take {path}: it keeps changing hands", file=str(path), fix="retry")


def read_file(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _publish(path: Path, record: dict | None) -> None:
    if record is None:
        return
    tmp = path.with_name(f".{LOCK}.restore.{os.getpid()}")
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    try:
        os.link(tmp, path)
    except FileExistsError:
        pass
    finally:
        tmp.unlink(missing_ok=True)


def release(run_dir: Path, pid: int | None = None) -> bool:
    """Remove RUN_DIR/LOCK if this host's process `pid` holds it; True if removed."""
    pid = os.getpid() if pid is None else pid
    holder = read(run_dir)
    if holder is None or holder.get("host") != socket.gethostname() or holder.get("pid") != pid:
        return False
    try:
        RunDir(Path(run_dir)).lock.unlink()
    except FileNotFoundError:
        return False
    return True


def _how_to_stop(holder: dict) -> str:
    if holder.get("job_id"):
        return f"scancel {holder['job_id']}"
    return f"kill {holder.get('pid')} on {holder.get('host')}"


def main(argv: list[str] | None = None) -> int:
    """`python -m stepc.runlock release RUN_DIR PID`: the stage scripts' and run.sbatch's exit trap;
    `acquire RUN_DIR PID COMMAND`: run.sbatch's first step (exit 2 naming the holder)."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) >= 3 and args[0] == "release":
        release(Path(args[1]), int(args[2]))
        return 0
    if len(args) >= 3 and args[0] == "acquire":
        try:
            acquire(Path(args[1]), int(args[2]), " ".join(args[3:]))
        except UserError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        return 0
    print("usage: python -m stepc.runlock acquire|release RUN_DIR PID [COMMAND]", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
