"""Exact resume after kill -9: the resumed run's weights are bit-identical to an uninterrupted run.

Run A is the session's `full_run`; run B is an identical spec compiled into another directory and
interrupted with SIGKILL to the stage script's process group (which must take torchrun's workers
down with it), in stage 1 after a checkpoint and in stage 2 in the middle of growth (both ranks held
at the fault-injection point `STEPC_FAULT_PAUSE_AT=growth`: the grown shards filled, no optimizer yet).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time

import pytest
import torch
from conftest import alive, check_ok, descendants, load_weights, read_metrics, run_stage, start_stage


def _kill_when(proc, condition, what, timeout=200.0):
    """Poll until condition() holds, then SIGKILL the stage's process group; assert nothing survives."""
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            pytest.fail(f"the stage exited ({proc.returncode}) before {what}")
        if time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.1)
    tree = descendants(proc.pid)
    assert tree, "torchrun and its workers should be running"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    deadline = time.monotonic() + 15
    while any(alive(pid) for pid in tree) and time.monotonic() < deadline:
        time.sleep(0.1)
    survivors = [pid for pid in tree if alive(pid)]
    for pid in survivors:  # never leave orphans writing into the run directory
        os.kill(pid, signal.SIGKILL)
    assert not survivors, f"workers {survivors} outlived the killed stage script"


def _assert_same_weights(a_dir, b_dir):
    a, b = load_weights(a_dir), load_weights(b_dir)
    assert sorted(a) == sorted(b)
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"resumed weights differ from the uninterrupted run: {different[:5]}"


def _complete_checkpoints(stage_dir):
    return sorted(p for p in stage_dir.glob("step-*") if (p / "COMPLETE").is_file() and not p.name.endswith(".tmp"))


def test_kill9_resume_matches_uninterrupted_run(full_run, make_run, monkeypatch):
    run_b = make_run.compile("rt")
    stage1 = run_b / "checkpoints" / "stage-1"

    # --- stage 1: kill -9 right after the first complete checkpoint, rerun to completion
    proc = start_stage(run_b, 1, run_b / "killed-1.log")
    _kill_when(proc, lambda: bool(_complete_checkpoints(stage1)), "the first stage-1 checkpoint")
    assert not (stage1 / "final").exists()
    first = _complete_checkpoints(stage1)[-1]
    resumed = check_ok(run_stage(run_b, 1))
    assert f"resumed stage 1 from {stage1}/step-" in resumed.stdout
    resumed_at = int(resumed.stdout.split(f"resumed stage 1 from {stage1}/step-")[1][:8])
    assert resumed_at >= int(first.name.split("-")[1])
    (record,) = [m for m in read_metrics(run_b) if m["event"] == "resume"]  # the DCP read, timed (bench/scale.py reads it)
    assert (record["stage"], record["step"]) == (1, resumed_at) and record["seconds"] > 0
    _assert_same_weights(full_run / "checkpoints" / "stage-1" / "final", stage1 / "final")
    steps1 = json.loads((run_b / "manifest.json").read_text())["plan"]["stages"][0]["steps"]
    last = [m for m in read_metrics(run_b) if m["event"] == "train" and m["stage"] == 1][-1]
    assert last["step"] == steps1

    # --- a truncated shard in the newest checkpoint, and a leftover .tmp that looks newer still
    checkpoints = _complete_checkpoints(stage1)
    assert len(checkpoints) >= 2, checkpoints
    older, newest = checkpoints[-2], checkpoints[-1]
    leftover = stage1 / "step-00000016.tmp"
    shutil.copytree(newest, leftover)  # even with a COMPLETE marker inside, a .tmp is never picked
    shard = sorted(newest.glob("*.distcp"))[0]
    with open(shard, "r+b") as handle:
        handle.truncate(shard.stat().st_size // 2)
    shutil.rmtree(stage1 / "final")
    again = check_ok(run_stage(run_b, 1))
    assert "skipping incomplete checkpoint" in again.stderr and shard.name in again.stderr
    assert f"resumed stage 1 from {older} at step {int(older.name.split('-')[1])}" in again.stdout
    assert ".tmp" not in again.stdout.split("resumed stage 1 from")[1].splitlines()[0]
    _assert_same_weights(full_run / "checkpoints" / "stage-1" / "final", stage1 / "final")
    shutil.rmtree(leftover)

    # --- stage 2: kill -9 in the middle of growth (both ranks held there), rerun to completion
    stage2 = run_b / "checkpoints" / "stage-2"
    marker = run_b / "paused"
    monkeypatch.setenv("STEPC_FAULT_PAUSE_AT", "growth")
    monkeypatch.setenv("STEPC_FAULT_PAUSE_FILE", str(marker))
    proc = start_stage(run_b, 2, run_b / "killed-2.log")
    monkeypatch.delenv("STEPC_FAULT_PAUSE_AT")  # the rerun below must not pause
    in_growth = lambda: all(marker.with_name(f"paused.rank{r}").is_file() for r in range(2))  # noqa: E731
    _kill_when(proc, in_growth, "both ranks to reach the growth pause point")
    assert not any(m["stage"] == 2 for m in read_metrics(run_b))  # killed before stage 2 recorded anything
    assert not _complete_checkpoints(stage2) and not (stage2 / "final").exists()
    check_ok(run_stage(run_b, 2))
    _assert_same_weights(full_run / "export", run_b / "export")
