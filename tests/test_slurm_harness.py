"""Tests of the real one-node SLURM test cluster (tests/slurm_cluster.py).

Skipped (with the reason) when slurm/munge are not installed or not root;
install them with ``bash tests/install_slurm.sh``.

What these tests establish about slurm 22.05 (Debian 12) in this setup:

* ``sbatch(wait=True)`` returns the batch script's exit code (3 -> 3), as ``sbatch --wait`` does; the script
  must use ``set -euo pipefail`` so a failing ``srun`` step fails the job.
* ``scancel JOB`` (no --signal): every process of the job (batch shell and
  steps) gets SIGCONT+SIGTERM, SIGKILL after KillWait. A ``trap ... TERM`` in
  the batch script runs -- but bash only runs traps once the foreground
  command returns, so run the step as ``srun ... & wait $!``. JobState is
  CANCELLED (whatever the trap exits with; ExitCode shows the trap's status).
* ``scancel --signal=USR1 --batch JOB``: only the batch shell gets the signal,
  nothing is cancelled; the job ends however the trap exits (exit 7 ->
  FAILED, ExitCode 7:0). This is also what ``#SBATCH --signal=B:USR1@SECS``
  delivers SECS before the time limit.
* ``scontrol requeue JOB`` on a RUNNING ``#SBATCH --requeue`` job works: the
  job is killed (SIGTERM to all processes), goes PENDING with
  Reason=BeginTime for ``cred_expire`` seconds (slurm default 120 s; the
  harness sets 10 s), then runs again with the SAME job id and
  ``SLURM_RESTART_COUNT=1`` in its environment (Restarts=1 in scontrol).
"""

from __future__ import annotations

import sys
import textwrap
import time
from pathlib import Path

import pytest

try:
    from slurm_cluster import SlurmCluster, slurm_available, slurm_cluster_fixture
except ImportError:  # e.g. --import-mode=importlib: tests/ is not on sys.path
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from slurm_cluster import SlurmCluster, slurm_available, slurm_cluster_fixture

pytestmark = pytest.mark.skipif(slurm_available() is not None,
                                reason=str(slurm_available()))

# one cluster for the whole session (starts in ~0.2 s once packages are installed)
slurm_cluster = slurm_cluster_fixture(scope="session")


def _script(path: Path, body: str) -> Path:
    path.write_text("#!/bin/bash\n" + textwrap.dedent(body).lstrip("\n"))
    path.chmod(0o755)
    return path


def _wait_file(path: Path, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def test_cluster_is_up(slurm_cluster: SlurmCluster):
    assert slurm_cluster.node_state() == "idle"
    assert slurm_cluster.start_seconds is not None and slurm_cluster.start_seconds < 60
    assert len(str(slurm_cluster.dir)) < 30            # unix socket path limit
    assert set(slurm_cluster.pids) == {"munged", "slurmctld", "slurmd"}
    assert slurm_cluster.squeue() == []


def test_two_step_job_ok(slurm_cluster: SlurmCluster, tmp_path: Path):
    out = tmp_path / "result.txt"
    script = _script(tmp_path / "ok.sbatch", f"""
        #SBATCH --job-name=two-steps
        #SBATCH --ntasks=1
        #SBATCH --cpus-per-task=1
        #SBATCH --time=5
        set -euo pipefail
        srun --cpus-per-task="$SLURM_CPUS_PER_TASK" bash -c 'echo "step0 $SLURM_STEP_ID" > {out}'
        srun --cpus-per-task="$SLURM_CPUS_PER_TASK" bash -c 'echo "step1 $SLURM_STEP_ID $GREETING" >> {out}'
        exit 0
        """)
    rc, job_id = slurm_cluster.sbatch(script, f"--output={tmp_path}/%j.out",
                                      env={"GREETING": "hello"}, cwd=tmp_path)
    assert rc == 0, (tmp_path / f"{job_id}.out").read_text()
    assert job_id is not None
    assert out.read_text().splitlines() == ["step0 0", "step1 1 hello"]
    info = slurm_cluster.job_info(job_id)
    assert info["JobState"] == "COMPLETED"
    assert info["ExitCode"] == "0:0"
    assert info["WorkDir"] == str(tmp_path)


def test_failing_job_returns_exit_code(slurm_cluster: SlurmCluster, tmp_path: Path):
    script = _script(tmp_path / "fail.sbatch", """
        set -euo pipefail
        srun --cpus-per-task=1 bash -c 'exit 3'
        echo "not reached"
        """)
    res = slurm_cluster.sbatch(script, f"--output={tmp_path}/%j.out")
    rc, job_id = res
    assert rc == 3, res
    assert slurm_cluster.job_state(job_id) == "FAILED"
    assert slurm_cluster.exit_code(job_id) == (3, 0)
    assert "not reached" not in (tmp_path / f"{job_id}.out").read_text()


def test_impossible_job_rejected_at_submit(slurm_cluster: SlurmCluster, tmp_path: Path):
    # EnforcePartLimits=ALL: rejected at once instead of pending forever
    script = _script(tmp_path / "big.sbatch", "exit 0\n")
    res = slurm_cluster.sbatch(script, "--cpus-per-task=999", wait=False)
    assert res.returncode != 0 and res.job_id is None, res
    assert res.duration < 10


def test_scancel_running_job(slurm_cluster: SlurmCluster, tmp_path: Path):
    started, trapped = tmp_path / "started", tmp_path / "trapped"
    script = _script(tmp_path / "sleep.sbatch", f"""
        set -euo pipefail
        trap 'echo "TERM" > {trapped}; exit 143' TERM
        touch {started}
        # `& wait`: bash runs the trap as soon as the signal arrives (with a
        # foreground srun it would run only after srun has exited)
        srun --cpus-per-task=1 sleep 300 &
        wait $!
        """)
    rc, job_id = slurm_cluster.sbatch(script, f"--output={tmp_path}/%j.out", wait=False)
    assert rc == 0
    _wait_file(started)
    time.sleep(0.5)  # let the srun step start
    t0 = time.monotonic()
    slurm_cluster.scancel(job_id)
    assert slurm_cluster.wait_job(job_id, timeout=30) == "CANCELLED"
    assert time.monotonic() - t0 < slurm_cluster.kill_wait + 5
    assert trapped.read_text().strip() == "TERM"
    assert slurm_cluster.squeue() == []
    assert slurm_cluster.leftover_job_pids() == []


def test_signal_to_batch_shell_only(slurm_cluster: SlurmCluster, tmp_path: Path):
    started, trapped = tmp_path / "started", tmp_path / "trapped"
    script = _script(tmp_path / "usr1.sbatch", f"""
        set -euo pipefail
        trap 'echo "USR1" > {trapped}; exit 7' USR1
        touch {started}
        srun --cpus-per-task=1 sleep 300 &
        wait $!
        """)
    _, job_id = slurm_cluster.sbatch(script, f"--output={tmp_path}/%j.out", wait=False)
    _wait_file(started)
    time.sleep(0.5)
    slurm_cluster.scancel(job_id, signal="USR1", batch=True)
    # not cancelled: the job ends the way the batch script's trap exits
    assert slurm_cluster.wait_job(job_id, timeout=30) == "FAILED"
    assert slurm_cluster.exit_code(job_id) == (7, 0)
    assert trapped.read_text().strip() == "USR1"
    # the still-running srun step is killed when the batch script ends
    assert slurm_cluster.squeue() == []
    assert slurm_cluster.leftover_job_pids() == []


def test_requeue_running_job(slurm_cluster: SlurmCluster, tmp_path: Path):
    log, started = tmp_path / "runs.log", tmp_path / "started"
    script = _script(tmp_path / "requeue.sbatch", f"""
        #SBATCH --requeue
        set -euo pipefail
        echo "run restart=${{SLURM_RESTART_COUNT:-0}} job=$SLURM_JOB_ID" >> {log}
        if [[ "${{SLURM_RESTART_COUNT:-0}}" == 0 ]]; then
            touch {started}
            srun --cpus-per-task=1 sleep 300 &
            wait $!
        fi
        exit 0
        """)
    _, job_id = slurm_cluster.sbatch(script, f"--output={tmp_path}/%j.out", wait=False)
    _wait_file(started)
    r = slurm_cluster.requeue(job_id)
    assert r.returncode == 0, r.stderr
    t0 = time.monotonic()
    # killed, PENDING (Reason=BeginTime) for cred_expire s, then runs again
    assert slurm_cluster.wait_job(job_id, timeout=slurm_cluster.cred_expire + 40) == "COMPLETED"
    rerun_after = time.monotonic() - t0
    assert rerun_after >= slurm_cluster.cred_expire - 1
    assert log.read_text().splitlines() == [f"run restart=0 job={job_id}",
                                            f"run restart=1 job={job_id}"]
    info = slurm_cluster.job_info(job_id)
    assert info["Restarts"] == "1"
    assert info["ExitCode"] == "0:0"


def test_private_cluster_stop_kills_daemons_and_escaped_processes(tmp_path: Path):
    """A second, short-lived cluster: stop() must leave no daemon, no job
    process and no temp dir behind."""
    marker = tmp_path / "escaped"
    with SlurmCluster() as c:
        pids, cdir = dict(c.pids), c.dir
        script = _script(tmp_path / "escape.sbatch", f"""
            set -euo pipefail
            # detach a process: proctrack/linuxproc loses track of it
            setsid bash -c 'echo $$ > {marker}; exec sleep 300' < /dev/null > /dev/null 2>&1 &
            sleep 0.5
            """)
        rc, job_id = c.sbatch(script, f"--output={tmp_path}/%j.out", wait=False)
        assert rc == 0
        assert c.wait_job(job_id, timeout=30) == "COMPLETED"
        _wait_file(marker)
        escaped_pid = int(marker.read_text().strip())
        # proctrack/linuxproc trade-off: the detached process outlives its job...
        assert _alive(escaped_pid)
        assert escaped_pid in c.leftover_job_pids()
    # ...and stop() kills it (found by SLURM_CONF=<this cluster> in its environ)
    for name, pid in pids.items():
        assert not _alive(pid), f"{name} (pid {pid}) still running after stop()"
    assert not _alive(escaped_pid)
    assert not cdir.exists()


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")
