"""The train records ([log] every_steps) and the pre-clip gradient norm they carry, against an
independent computation: the first step's gradients of the same model on the same batch, by hand."""

from __future__ import annotations

import pytest
import torch
from conftest import check_ok, read_metrics, run_stage


def test_records_follow_log_every_steps_and_carry_the_pre_clip_gradient_norm(make_run):
    """A record every step ([log] every_steps = 1); step 1's grad_norm is the norm of the gradients of
    the fresh model on step 1's batch computed by hand, before clipping (grad_clip 0.5 is active)."""
    from eager_reference import fresh_model

    from stepc.runtime.data.prepared import open_prepared, training_sets
    from stepc.schema.manifest import load_manifest

    run1 = make_run.compile("gn1", log={"every_steps": 1}, launch={"nproc_per_node": 1}, train={"grad_clip": 0.5})
    check_ok(run_stage(run1, 1, nproc=1))
    spec, stage = load_manifest(run1).spec, load_manifest(run1).plan.stages[0]
    train = [m for m in read_metrics(run1) if m["event"] == "train" and m["stage"] == 1]
    assert [m["step"] for m in train] == list(range(1, stage.steps + 1))  # not the default every 10
    first = next(m for m in read_metrics(run1) if m["event"] == "train" and m["step"] == 1)
    model = fresh_model(spec, stage.total_layers, spec.experiment.seed)
    sampler, _ = training_sets(open_prepared(run1, spec.data, spec.model.seq_len), spec.data.holdout_fraction,
                               spec.experiment.seed, spec.data.weights_at(1))
    accum = spec.train.global_batch_tokens // (spec.model.seq_len * spec.train.micro_batch_size)
    for micro in range(accum):
        x = torch.from_numpy(sampler.batch(stage.data_step_offset, micro, 0, 1, spec.train.micro_batch_size, accum))
        (model(input_ids=x, labels=x).loss / accum).backward()
    norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()])).item()
    assert norm > 0.5  # clipping was active: a logged post-clip norm would read 0.5
    assert first["grad_norm"] == pytest.approx(norm, rel=1e-5)
