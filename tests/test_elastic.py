"""Elastic resume: a stage checkpointed on N ranks resumes on M ranks (real torchrun, gloo).

The samples of an optimizer step depend only on the step and the global batch (data.BlockSampler), and
DCP reshards the checkpoint (FSDP2 shards <-> one unsharded rank). Run B stops stage 1 on 2 ranks
(SIGTERM to rank 1's worker alone: both ranks agree to stop after the same step and checkpoint it)
and finishes it on 1 rank; it stops stage 2 on 1 rank and finishes it on 2. Its logged losses and
weights match the uninterrupted 2-rank run A (`full_run`) to within float32 reduction-order noise. A
rank count that cannot tile the global batch is refused before torchrun starts (exit 2, saying why).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import alive, check_ok, descendants, load_weights, read_metrics, run_stage, start_stage

from stepc.runtime.data.prepared import BlockSampler

LOSS_RTOL = 1e-4     # measured: the logged losses agreed to every printed digit
WEIGHT_ATOL = 1e-4   # measured: 1.5e-05 max absolute weight difference after both stages


def test_the_samples_of_a_step_do_not_depend_on_the_rank_count():
    sampler = BlockSampler(np.arange(1000).reshape(-1, 1), seed=7, indices=np.arange(0, 1000, 3))
    global_samples, micro = 16, 2
    for step in range(0, 40, 7):
        per_world = []
        for world in (1, 2, 4, 8):
            accum = global_samples // (micro * world)
            ids = [sampler.block_ids(step, m, r, world, micro, accum) for m in range(accum) for r in range(world)]
            per_world.append(sorted(np.concatenate(ids).tolist()))
        assert all(p == per_world[0] for p in per_world), step


def _worker(root: int, rank: int) -> int:
    """The pid of the torchrun worker with RANK=`rank` below process `root` (read from /proc; Linux only)."""
    for pid in descendants(root):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if f"RANK={rank}".encode() in environ and b"stepc.runtime" in cmdline and b"launch" not in cmdline:
            return pid
    raise AssertionError(f"no worker of rank {rank} below pid {root}")


def _stop_mid_stage(run_dir, stage, nproc, after_step=10, only_rank=None):
    """SIGTERM mid-stage to the stage script's process group, or to one worker alone (`only_rank`)."""
    log = run_dir / f"stage-{stage}-{nproc}.out"
    proc = start_stage(run_dir, stage, log, nproc=nproc)
    deadline = time.monotonic() + 240
    while not re.search(rf"stage {stage}(/\d+)? step {after_step}/", log.read_text(errors="replace") if log.exists() else ""):
        assert proc.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)
    tree = descendants(proc.pid)
    if only_rank is None:
        os.killpg(proc.pid, signal.SIGTERM)
    else:
        os.kill(_worker(proc.pid, only_rank), signal.SIGTERM)
    try:
        code = proc.wait(timeout=120)
    except subprocess.TimeoutExpired:  # a rank that never agreed to stop hangs its peer in a collective
        os.killpg(proc.pid, signal.SIGKILL)
        for pid in tree:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        raise
    assert code == 75, log.read_text()[-3000:]
    deadline = time.monotonic() + 15
    while any(alive(p) for p in tree) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [p for p in tree if alive(p)], "a worker outlived the stopped stage"
    return json.loads((run_dir / "checkpoints" / f"stage-{stage}" / "STOPPED").read_text())


def _losses(run_dir, stage):
    return {m["step"]: m["loss"] for m in read_metrics(run_dir) if m["event"] == "train" and m["stage"] == stage}


def test_resume_on_another_rank_count(full_run, make_run):
    run_b = make_run.compile("rt")
    stage1, stage2 = run_b / "checkpoints" / "stage-1", run_b / "checkpoints" / "stage-2"

    # 2 ranks, only rank 1 signalled: rank 0 stops after the same step (it records the stop as a peer's)
    stopped = _stop_mid_stage(run_b, 1, nproc=2, only_rank=1)
    at1 = stopped["step"]
    assert stopped["signal"] == "peer" and stopped["steps_done_at_signal"] is None, stopped
    assert sorted(p.name for p in stage1.glob("step-*") if (p / "COMPLETE").is_file())[-1] == f"step-{at1:08d}"
    resumed = check_ok(run_stage(run_b, 1, nproc=1))              # ... -> 1 rank
    assert f"resumed stage 1 from {stage1}/step-{at1:08d} at step {at1}" in resumed.stdout
    at2 = _stop_mid_stage(run_b, 2, nproc=1)["step"]              # 1 rank ...
    resumed = check_ok(run_stage(run_b, 2, nproc=2))              # ... -> 2 ranks
    assert f"resumed stage 2 from {stage2}/step-{at2:08d} at step {at2}" in resumed.stdout
    starts = [(m["stage"], m["world"]) for m in read_metrics(run_b) if m["event"] == "stage_start"]
    assert starts == [(1, 2), (2, 1)], starts

    for stage in (1, 2):
        a, b = _losses(full_run, stage), _losses(run_b, stage)
        assert a.keys() == b.keys() and a, (a, b)
        for step in a:
            assert b[step] == pytest.approx(a[step], rel=LOSS_RTOL), (stage, step, a[step], b[step])
    wa, wb = load_weights(full_run / "export"), load_weights(run_b / "export")
    assert wa.keys() == wb.keys()
    worst = max(float((wa[k].double() - wb[k].double()).abs().max()) for k in wa)
    print(f"elastic 2->1->2: max |weight difference| {worst:.2e}; losses {_losses(run_b, 2)} vs {_losses(full_run, 2)}")
    assert worst < WEIGHT_ATOL
    assert worst > 0  # a different reduction order really happened (else this test proves nothing about resharding)


def test_a_rank_count_that_cannot_tile_the_global_batch_is_refused(make_run):
    run_dir = make_run.compile("rt")  # global batch 256 tokens = seq 64 x micro-batch 2 x 2 ranks
    proc = run_stage(run_dir, 1, nproc=3, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert "cannot run on 3 rank(s): train.global_batch_tokens = 256 is not a multiple of" in proc.stderr
    assert "Traceback" not in proc.stderr and not (run_dir / "checkpoints" / "stage-1").exists()
    proc = run_stage(run_dir, 1, nproc=4, timeout=60)  # 256 / (64 x 2 x 4) < 1: no micro-batch per rank
    assert proc.returncode == 2 and "cannot run on 4 rank(s)" in proc.stderr
