"""One launch per run directory: RUN_DIR/LOCK (RunDir.lock) names the launch that holds it.

Two `stepc run`s, stage scripts or SLURM jobs training the same run directory would both write
checkpoints, metrics and exports into it. The first takes RUN_DIR/LOCK before it writes anything;
every other launch exits 2 naming the holder (host, PID, SLURM job, command, since when).

- Works across nodes on a shared filesystem: the record is written to a private temp file and
  published with link(2), which is atomic and fails when LOCK exists, also on NFS (where O_EXCL
  creation was historically not atomic); LOCK is never seen half-written.
- One holder, many processes: every process of a launch carries STEPC_RUN_LOCK=<owner> in its
  environment (`stepc run` exports it to the stage scripts, a stage script run by hand exports its own
  before the preflight, torchrun passes it to the workers), and in a SLURM job the owner is the job id,
  so every node and rank of that job (and the job's requeued incarnations) are the same holder.
- The lock is held while anything of its launch runs, not only its taker: `kill -9` of `stepc run`
  leaves its stage script, torchrun and the workers training (re-parented to init), so on this host a
  launch is gone only when the recorded PID is gone (or is another process now: the start time
  differs; or an unreaped zombie) AND no live process carries its owner. Then the lock is taken over
  with a warning. A SLURM job's lock is stale when `squeue` no longer lists the job as running.
- A LOCK stepc did not write (empty, not a record, a symlink, a directory) is never taken over or
  waited for: the refusal says what it is and how to clear it.

Not rundir.atomic_write: its rename replaces an existing file, a lock must fail when one exists.
Hand-written: filelock/fcntl locks are per host (flock does not cross NFS clients reliably) and
record no holder to name in the refusal.
"""

from __future__ import annotations

import json
import os
import shlex
import socket
import stat
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


def _stat(pid: int) -> list[str] | None:
    """/proc/PID/stat's fields after the command name (state first), or None without /proc or process."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (/proc/PID/stat field 22): tells a
    recycled PID from the original holder. None when the process does not exist or is a zombie
    (it exited; only its parent has not collected its exit status yet)."""
    fields = _stat(pid)
    if fields is None:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            return ""
        return ""  # alive, start time unknown (no /proc)
    if fields[0] in ("Z", "X"):
        return None
    return fields[19]


def owner_key(job_id: str | None, host: str, pid: int) -> str:
    """The launch's name: its SLURM job, else STEPC_RUN_LOCK when this process was started inside a
    launch (a stage script run by hand exports its own before the preflight), else host:pid:start
    (the start time, so a recycled PID is never the same launch)."""
    if job_id:
        return f"slurm-job-{job_id}"
    return os.environ.get(ENV) or f"{host}:{pid}:{_start_time(pid) or ''}"


def _members(owner: str) -> list[tuple[int, str]]:
    """(pid, command line) of every live process on this host that carries STEPC_RUN_LOCK=owner: the
    parts of that launch still running, whoever took the lock. Processes of other users cannot be read
    and do not count (a run directory is trained by one user). Empty without /proc."""
    needle = f"\0{ENV}={owner}\0".encode()
    found = []
    try:
        entries = [e for e in os.scandir("/proc") if e.name.isdigit()]
    except OSError:
        return []
    for entry in entries:
        pid = int(entry.name)
        try:
            environ = Path(entry.path, "environ").read_bytes()  # a zombie's is empty
            if needle not in b"\0" + environ or pid == os.getpid() or _start_time(pid) is None:
                continue
            command = Path(entry.path, "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        found.append((pid, command[:80] + ("..." if len(command) > 80 else "")))
    return found


def describe(holder: dict) -> str:
    who = f"SLURM job {holder['job_id']}" if holder.get("job_id") else holder.get("command") or "a launch"
    return (f"{who} (pid {holder.get('pid')} on {holder.get('host')}, since "
            f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(holder.get('since', 0)))})")


def read(run_dir: Path) -> dict | None:
    """The lock record, or None when there is none (or it is not one: see `inspect`)."""
    found = inspect(RunDir(Path(run_dir)).lock)
    return found if isinstance(found, dict) else None


_RECORD = {"owner": str, "host": str, "pid": int}


def inspect(path: Path) -> dict | str | None:
    """The record at `path`; None when there is no LOCK; a sentence saying what it is when it is not a
    record stepc writes (empty, not JSON, not a record, a symlink, a directory). A record is published
    whole by link(2), so such a file never turns into a record by itself: it is refused, not waited for."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return None
    except OSError as exc:
        return f"cannot be read ({exc.strerror})"
    if stat.S_ISLNK(info.st_mode):
        target = os.readlink(path)
        return f"is a symbolic link to {target!r}{'' if path.exists() else ', which does not exist'}"
    if not stat.S_ISREG(info.st_mode):
        return "is a directory" if stat.S_ISDIR(info.st_mode) else "is not a regular file"
    if info.st_size == 0:
        return "is empty"
    try:
        record = json.loads(path.read_bytes()[:65536])
    except FileNotFoundError:
        return None  # released between lstat and read
    except (OSError, ValueError) as exc:
        return f"is not a lock record ({exc})"
    if not isinstance(record, dict) or any(not isinstance(record.get(k), t) for k, t in _RECORD.items()):
        return "is not a lock record (it needs owner, host and pid)"
    return record


def _stale(holder: dict, path: Path) -> str | None:
    """Why the holder is gone, or None while it may still be running. Raises LockHeld when the process
    that took the lock is gone but other processes of its launch still run."""
    host, pid = holder.get("host"), holder.get("pid")
    if host == socket.gethostname() and isinstance(pid, int):
        now = _start_time(pid)
        if now is None:
            reason = f"process {pid} on {host} {'exited (an unreaped zombie)' if _stat(pid) else 'is gone'}"
        elif holder.get("start") and now and now != holder["start"]:
            reason = f"PID {pid} on {host} is another process now"
        else:
            return None
        survivors = _members(str(holder.get("owner")))
        if survivors:
            pids = " ".join(str(p) for p, _ in survivors)
            raise LockHeld(f"another launch is training this run directory: {describe(holder)} is gone, but "
                           f"{len(survivors)} of its processes still run: "
                           + "; ".join(f"pid {p}: {cmd}" for p, cmd in survivors),
                           file=str(path),
                           fix=f"wait for them to finish, or stop them with `kill {pids}` (the stage checkpoints the "
                               "step in flight); the lock is taken over once nothing of that launch runs")
        return reason
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
        holder = inspect(path)
        if isinstance(holder, str):
            holder = _settled(path, holder)
        if holder is not None and (holder.get("owner") in (inherited, record["owner"])):
            return None  # our own launch (parent process, another node or a requeue of this job)
        if holder is not None:
            reason = _stale(holder, path)
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
    raise LockHeld(f"could not take {path}: other launches took and released it 50 times in a row", file=str(path),
                   fix="start one launch per run directory at a time (`stepc run` or its stage scripts, or one SLURM job)")


def _settled(path: Path, problem: str) -> dict | None:
    """A LOCK that is not a record: looked at again a moment later (a takeover may have just moved it),
    then refused with what it is and how to clear it."""
    time.sleep(0.2)
    again = inspect(path)
    if not isinstance(again, str):
        return again
    raise LockHeld(f"the run directory's lock file {again}: stepc never writes one like it, so it cannot tell "
                   "whether a launch is training this run directory", file=str(path),
                   fix=f"make sure no `stepc run`, stage script or SLURM job of this run directory is running "
                       f"(ps, squeue), then remove it: rm -r {shlex.quote(str(path))}")


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
