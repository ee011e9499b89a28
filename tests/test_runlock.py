"""One launch per run directory (stepc/runlock.py) and `stepc run`'s checks before it executes anything.

Real processes, no torch: a lock held by a live process refuses `stepc run` and a stage script (exit 2,
naming the holder) before anything is written; a holder that is gone (dead PID, or a recycled one) is
taken over with a warning; a replaced stage script never runs; a stage's own refusal (exit 2) passes
through `stepc run` with its message. (A refusal while a real stage trains: tests/test_preempt.py;
SLURM jobs on one run directory: tests/test_slurm_preempt.py.)
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import run_stage, stage_env

from stepc import runlock


def _stepc_run(run_dir, *args):
    return subprocess.run([sys.executable, "-m", "stepc.cli", "run", str(run_dir), *args], env=stage_env(),
                          cwd=run_dir, capture_output=True, text=True, timeout=120)


def _written(run_dir):
    """What launches write (compile makes logs/ empty, for SLURM's --output)."""
    return sorted(p.name for p in run_dir.iterdir()
                  if p.name in ("checkpoints", "metrics.jsonl", "cache", "LOCK") or (p.name == "logs" and any(p.iterdir())))


@pytest.fixture
def holder():
    proc = subprocess.Popen(["sleep", "300"])
    yield proc
    proc.kill()
    proc.wait()


def test_a_live_holder_refuses_stepc_run_and_stage_scripts(make_run, holder):
    run_dir = make_run.compile("lk")
    record = runlock.acquire(run_dir, holder.pid, "stepc run")
    assert record is not None and (run_dir / "LOCK").is_file()
    for proc in (_stepc_run(run_dir), run_stage(run_dir, 1, timeout=60)):
        assert proc.returncode == 2, proc.stderr
        assert "another launch is training this run directory" in proc.stderr
        assert f"pid {holder.pid} on {socket.gethostname()}" in proc.stderr and "kill" in proc.stderr
        assert "Traceback" not in proc.stderr and "failed with exit code" not in proc.stderr
    assert _written(run_dir) == ["LOCK"]  # nothing else: the refusal came before any write
    assert json.loads((run_dir / "LOCK").read_text())["pid"] == holder.pid
    assert runlock.release(run_dir, holder.pid) and not (run_dir / "LOCK").exists()


def test_a_dead_or_recycled_holder_is_taken_over_with_a_warning(make_run, capsys):
    run_dir = make_run.compile("lk")
    gone = subprocess.Popen(["true"])
    gone.wait()
    assert runlock.acquire(run_dir, gone.pid, "stage-1.sh") is not None
    capsys.readouterr()
    mine = runlock.acquire(run_dir, None, "stepc run")
    assert re.search(f"warning: taking over the stale lock .* process {gone.pid} on .* is gone", capsys.readouterr().err)
    assert mine is not None and runlock.read(run_dir)["owner"] == mine["owner"]
    # a live PID with another start time is a recycled PID: stale as well
    record = json.loads((run_dir / "LOCK").read_text())
    record.update(pid=1, owner=f"{socket.gethostname()}:1", start="1")
    (run_dir / "LOCK").write_text(json.dumps(record))
    assert runlock.acquire(run_dir, None, "stepc run") is not None
    assert re.search("warning: taking over .* PID 1 on .* is another process now", capsys.readouterr().err)
    # this (live) process holds it now: another launch is refused, no takeover
    with pytest.raises(runlock.LockHeld, match=f"pid {os.getpid()} on"):
        runlock.acquire(run_dir, os.getppid(), "stepc run")
    assert "taking over" not in capsys.readouterr().err


def test_same_slurm_job_is_one_holder(make_run, monkeypatch, holder):
    run_dir = make_run.compile("lk")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    assert runlock.acquire(run_dir, holder.pid, "run.sbatch")["owner"] == "slurm-job-4242"
    assert runlock.acquire(run_dir, None, "stage-1.sh") is None  # another node / a requeue of the job: inherited
    monkeypatch.setenv("SLURM_JOB_ID", "4243")
    with pytest.raises(runlock.LockHeld, match="SLURM job 4242"):
        runlock.acquire(run_dir, None, "run.sbatch")


def test_stepc_run_refuses_a_replaced_script_before_running_anything(make_run):
    run_dir = make_run.compile("lk")
    script = run_dir / "stage-2.sh"
    script.write_text(script.read_text().replace("set -euo pipefail", "set -euo pipefail\ntouch PWNED", 1))
    proc = _stepc_run(run_dir)
    assert proc.returncode == 2, proc.stderr
    assert "stage-2.sh differs from the script the manifest records" in proc.stderr
    assert "== stage 1" not in proc.stdout and _written(run_dir) == [] and not (run_dir / "PWNED").exists()


def test_a_refused_stage_passes_exit_2_and_its_message_through(make_run):
    run_dir = make_run.compile("lk")
    proc = _stepc_run(run_dir, "--stage", "2")
    assert proc.returncode == 2, proc.stderr
    assert "stage 2 needs stage 1 to finish first" in proc.stderr
    assert "failed with exit code" not in proc.stderr and "rerun" not in proc.stderr.split("needs stage 1")[0]
    assert not (run_dir / "LOCK").exists()


def test_a_zombie_holder_is_taken_over_with_a_warning(make_run, capsys):
    run_dir = make_run.compile("lk")
    child = subprocess.Popen(["sleep", "300"])
    try:
        assert runlock.acquire(run_dir, child.pid, "stepc run") is not None
        child.kill()  # exited, but not reaped (no wait yet): /proc still lists it, as state Z
        deadline = time.monotonic() + 10
        while Path(f"/proc/{child.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
            assert time.monotonic() < deadline
            time.sleep(0.01)
        capsys.readouterr()
        assert runlock.acquire(run_dir, None, "stepc run") is not None
        assert re.search(f"warning: taking over .* process {child.pid} on .* exited \\(an unreaped zombie\\)",
                         capsys.readouterr().err)
    finally:
        child.wait()


def test_the_lock_is_held_while_any_process_of_its_launch_lives(make_run, capsys):
    """The taker (stepc run) is gone but a process it started (a stage, a worker) still carries its owner."""
    run_dir = make_run.compile("lk")
    taker = subprocess.Popen(["sleep", "300"])
    record = runlock.acquire(run_dir, taker.pid, "stepc run")
    worker = subprocess.Popen(["sleep", "300"], env={**os.environ, runlock.ENV: record["owner"]})
    taker.kill()
    taker.wait()
    try:
        for proc in (_stepc_run(run_dir), run_stage(run_dir, 1, timeout=60)):
            assert proc.returncode == 2, proc.stderr
            assert f"stepc run (pid {taker.pid} on {socket.gethostname()}" in proc.stderr and "is gone, but" in proc.stderr
            assert f"pid {worker.pid}: sleep 300" in proc.stderr and f"`kill {worker.pid}`" in proc.stderr
            assert "taking over" not in proc.stderr and "Traceback" not in proc.stderr
        assert _written(run_dir) == ["LOCK"] and runlock.read(run_dir)["pid"] == taker.pid
    finally:
        worker.kill()
        worker.wait()
    capsys.readouterr()
    assert runlock.acquire(run_dir, None, "stepc run") is not None  # nothing of that launch is left
    assert f"process {taker.pid} on {socket.gethostname()} is gone" in capsys.readouterr().err


def test_a_lock_file_stepc_never_writes_is_refused_saying_what_it_is(make_run):
    """Empty, corrupt, not a record, a dangling symlink, a directory: never waited for ("retry"), never removed."""
    run_dir = make_run.compile("lk")
    lock = run_dir / "LOCK"
    kinds = {
        "empty": (lambda: lock.write_text(""), "is empty"),
        "corrupt": (lambda: lock.write_text('{"owner": "vm:1'), "is not a lock record ("),
        "not a record": (lambda: lock.write_text("[1, 2]"), "is not a lock record (it needs"),
        "dangling symlink": (lambda: lock.symlink_to(run_dir / "nowhere"),
                             f"is a symbolic link to '{run_dir / 'nowhere'}', which does not exist"),
        "directory": (lambda: lock.mkdir(), "is a directory"),
    }
    for kind, (make, said) in kinds.items():
        make()
        proc = _stepc_run(run_dir)
        assert proc.returncode == 2, (kind, proc.stderr)
        assert f"{lock}: the run directory's lock file {said}" in proc.stderr, (kind, proc.stderr)
        assert f"then remove it: rm -r {lock}" in proc.stderr, proc.stderr
        assert "retry" not in proc.stderr and "Traceback" not in proc.stderr and "== stage" not in proc.stdout
        assert os.path.lexists(lock), kind  # never removed for the user: a launch might be writing it
        lock.rmdir() if lock.is_dir() and not lock.is_symlink() else lock.unlink()
