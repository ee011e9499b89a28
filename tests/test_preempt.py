"""Preemption loses at most the step in flight, locally with real torchrun (2 gloo ranks).

Run A is the session's uninterrupted `full_run` (checkpoint every 6 steps). Run B is the same experiment
with periodic checkpoints switched off (checkpoint_every = 1000), so every checkpoint it resumes from
was written because of a signal:
- stage 1: SIGTERM to the stage script's process group mid-stage -> exit 75, STOPPED names the step,
  the only checkpoint is at that step, and it is the step in flight when the signal arrived + 1;
  while it runs, a second launch on the run directory is refused (exit 2, naming the holder);
- stage 1 resumed under `stepc run --stage 1`, which is killed with SIGKILL alone: its stage script and
  workers train on; a rerun is refused (exit 2) naming every process still running and trains nothing;
  the orphaned stage finishes stage 1 bit-identically, and the next launch takes the lock over (warning);
- stage 2: Ctrl-C (SIGINT to `stepc run`'s process group, as a terminal sends it) -> exit 130 with
  one line saying where it stopped; rerunning `stepc run` finishes;
- the final export is bit-identical to run A's.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import STAGE_TIMEOUT, alive, check_ok, descendants, load_weights, read_metrics, run_stage, stage_env, start_stage


def _wait_for_text(proc: subprocess.Popen, log: Path, pattern: str, timeout: float = 200.0) -> None:
    deadline = time.monotonic() + timeout
    while not re.search(pattern, log.read_text(errors="replace") if log.exists() else ""):
        if proc.poll() is not None:
            pytest.fail(f"exited ({proc.returncode}) before {pattern!r}:\n{log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail(f"timed out waiting for {pattern!r}")
        time.sleep(0.1)


def _complete(stage_dir: Path) -> list[int]:
    return sorted(int(p.name.split("-")[1]) for p in stage_dir.glob("step-*")
                  if (p / "COMPLETE").is_file() and not p.name.endswith(".tmp"))


def _same_weights(a_dir: Path, b_dir: Path) -> None:
    a, b = load_weights(a_dir), load_weights(b_dir)
    assert sorted(a) == sorted(b)
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"weights differ from the uninterrupted run: {differ[:5]}"


def test_signal_checkpoints_the_step_in_flight_and_resumes_bit_exactly(full_run, make_run):
    run_b = make_run.compile("rt", train={"checkpoint_every": 1000})
    stage1 = run_b / "checkpoints" / "stage-1"

    # --- stage 1: SIGTERM to the stage script's process group (bash + torchrun; the workers run in
    # sessions of their own and get it from the script)
    log = run_b / "stage-1.out"
    proc = start_stage(run_b, 1, log)
    deadline = time.monotonic() + 60
    while not (run_b / "LOCK").exists():
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.05)
    second = run_stage(run_b, 1, timeout=60)  # one launch per run directory
    assert second.returncode == 2, second.stderr
    assert "another launch is training this run directory" in second.stderr and f"pid {proc.pid}" in second.stderr
    _wait_for_text(proc, log, r"stage 1(/\d+)? step 10/")
    tree = descendants(proc.pid)
    # a stage script run by hand is a launch of its own: torchrun and the workers carry the lock's owner,
    # so the lock stays held while they live even if the script itself is killed (stepc/runlock.py)
    owner = json.loads((run_b / "LOCK").read_text())["owner"]
    workers = [p for p in tree if b"stepc.runtime" in Path(f"/proc/{p}/cmdline").read_bytes()]
    assert len(workers) >= 3, workers  # torchrun (stepc.runtime.launch) and 2 ranks
    carried = f"\0STEPC_RUN_LOCK={owner}\0".encode()
    assert [p for p in workers if carried not in b"\0" + Path(f"/proc/{p}/environ").read_bytes()] == [], owner
    os.killpg(proc.pid, signal.SIGTERM)
    assert proc.wait(timeout=120) == 75, log.read_text()[-3000:]
    deadline = time.monotonic() + 15
    while any(alive(p) for p in tree) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [p for p in tree if alive(p)], "workers outlived the stopped stage"
    record = json.loads((stage1 / "STOPPED").read_text())
    steps1 = json.loads((run_b / "manifest.json").read_text())["plan"]["stages"][0]["steps"]
    stopped_at = record["step"]
    assert 10 <= stopped_at < steps1, record
    assert record["signal"] == "SIGTERM"
    assert record["steps_done_at_signal"] + 1 == stopped_at  # only the step in flight was finished
    assert _complete(stage1) == [stopped_at]  # no periodic checkpoints in run B: this one is the signal's
    assert f"stopped by SIGTERM after step {stopped_at}; checkpoint written; rerun to resume" in log.read_text()
    assert not (run_b / "LOCK").exists()
    assert [m["step"] for m in read_metrics(run_b) if m["event"] == "stopped"] == [stopped_at]

    # --- stage 1 resumed under `stepc run --stage 1`, then kill -9 of `stepc run` alone: its stage script,
    # torchrun and both workers go on training, re-parented to init. While any of them lives a rerun is
    # refused, naming them, and trains nothing (a takeover would train stage 1 twice into one run directory).
    # The ranks hold after the first resumed step (faults.py), so the kill lands mid-stage however fast the
    # machine is; then they are let go and finish the stage on their own.
    assert stopped_at + 1 < steps1, (stopped_at, steps1)
    held, release, resumed_log = run_b / "held", run_b / "release", run_b / "resumed.out"
    env = {**stage_env(), "STEPC_FAULT_HOLD_AFTER_STEP": f"1:{stopped_at + 1}", "STEPC_FAULT_HOLD_FILE": str(held),
           "STEPC_FAULT_HOLD_RELEASE": str(release)}
    with open(resumed_log, "w") as handle:
        killed = subprocess.Popen([sys.executable, "-m", "stepc.cli", "run", str(run_b), "--stage", "1"], env=env,
                                  cwd=run_b, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 200
    while not all(Path(f"{held}.rank{r}").exists() for r in (0, 1)):
        assert killed.poll() is None and time.monotonic() < deadline, resumed_log.read_text()[-3000:]
        time.sleep(0.1)
    launch = descendants(killed.pid)
    try:
        os.kill(killed.pid, signal.SIGKILL)
        killed.wait()
        metrics_before = (run_b / "metrics.jsonl").read_bytes()
        refused = subprocess.run([sys.executable, "-m", "stepc.cli", "run", str(run_b)], env=stage_env(), cwd=run_b,
                                 capture_output=True, text=True, timeout=STAGE_TIMEOUT)
        assert refused.returncode == 2, refused.stderr[-3000:]
        assert f"stepc run (pid {killed.pid} on" in refused.stderr and "is gone, but" in refused.stderr
        assert "taking over" not in refused.stderr and "Traceback" not in refused.stderr
        named = {int(p) for p in re.search(r"`kill ([0-9 ]+)`", refused.stderr).group(1).split()}
        assert named == {p for p in launch if alive(p)} and len(named) >= 4, (named, launch)  # bash, torchrun, 2 workers
        assert (run_b / "metrics.jsonl").read_bytes() == metrics_before  # the refused rerun trained nothing
        release.touch()
        deadline = time.monotonic() + STAGE_TIMEOUT
        while any(alive(p) for p in launch) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [p for p in launch if alive(p)], resumed_log.read_text()[-3000:]
    finally:  # a failure above must not leave the held ranks training for HOLD_LIMIT_S
        for pid in launch:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
    assert f"resumed stage 1 from {stage1}/step-{stopped_at:08d} at step {stopped_at}" in resumed_log.read_text()
    assert not (stage1 / "STOPPED").exists()
    _same_weights(full_run / "checkpoints" / "stage-1" / "final", stage1 / "final")

    # --- stage 2 under `stepc run`: Ctrl-C (SIGINT to the whole foreground process group)
    out = run_b / "run.out"
    with open(out, "w") as handle:
        run = subprocess.Popen([sys.executable, "-m", "stepc.cli", "run", str(run_b)], env=stage_env(), cwd=run_b,
                               stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)
    _wait_for_text(run, out, r"stage 2(/\d+)? step 10/")
    os.killpg(run.pid, signal.SIGINT)
    assert run.wait(timeout=120) == 130, out.read_text()[-3000:]
    stopped2 = json.loads((run_b / "checkpoints" / "stage-2" / "STOPPED").read_text())["step"]
    lines = [line for line in out.read_text().splitlines() if line.startswith("interrupted")]
    expected = f"interrupted: stage 2 stopped after step {stopped2} (checkpoint written); rerun `stepc run {run_b}` to resume"
    assert lines == [expected], out.read_text()[-2000:]
    assert f"warning: taking over the stale lock {run_b}/LOCK of stepc run (pid {killed.pid}" in out.read_text()
    assert not (run_b / "LOCK").exists()

    again = subprocess.run([sys.executable, "-m", "stepc.cli", "run", str(run_b)], env=stage_env(), cwd=run_b,
                           capture_output=True, text=True, timeout=2 * STAGE_TIMEOUT)
    check_ok(again)
    assert f"at step {stopped2}" in again.stdout
    _same_weights(full_run / "export", run_b / "export")
