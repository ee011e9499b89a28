"""The FSDP2 runtime through the emitted stage scripts: learning, FSDP equivalence, memory accounting,
the export, and the refusals of the stage scripts (exit code 2).

Most checks read the session's `full_run` (the test spec run through both stages with 2 gloo ranks).
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import check_ok, load_weights, read_metrics, run_stage, stage_env


def _events(metrics, event, stage=None):
    return [m for m in metrics if m["event"] == event and (stage is None or m["stage"] == stage)]


def test_stage1_lowers_train_loss_and_heldout_ppl(full_run):
    metrics = read_metrics(full_run)
    train = _events(metrics, "train", 1)
    assert len(train) >= 2
    assert train[-1]["loss"] < train[0]["loss"] - 0.2, train
    assert train[0]["loss"] < math.log(512) + 0.5  # sanity: not diverging from the uniform baseline
    evals = _events(metrics, "eval", 1)
    assert len(evals) >= 2
    assert evals[-1]["ppl_heldout"] < evals[0]["ppl_heldout"]
    assert evals[-1]["ppl_heldout"] < 400  # well below uniform over the 512-token vocabulary (ppl 512)


def test_measured_model_state_bytes_equal_the_prediction(full_run):
    metrics = read_metrics(full_run)
    manifest = json.loads((full_run / "manifest.json").read_text())
    for info in manifest["plan"]["stages"]:
        train = _events(metrics, "train", info["index"])
        assert train, f"no train metrics for stage {info['index']}"
        (start,) = _events(metrics, "stage_start", info["index"])
        for record in train:
            assert record["model_state_bytes"] == record["predicted_model_state_bytes"] == start["predicted_model_state_bytes"]
        # the compiler's exact count, plus the AdamW step scalars each extra rank holds
        assert start["predicted_model_state_bytes"] >= info["exact_model_state_bytes"]
        assert start["predicted_model_state_bytes"] - info["exact_model_state_bytes"] < 4 * 200


def test_export_loads_with_transformers_and_reproduces_the_final_eval(full_run, monkeypatch):
    from transformers import AutoModelForCausalLM

    from stepc.runtime.data.prepared import open_prepared
    from stepc.runtime.data.evalsets import iter_eval_batches
    from stepc.schema.spec import Data

    manifest = json.loads((full_run / "manifest.json").read_text())
    spec = manifest["spec"]
    model = AutoModelForCausalLM.from_pretrained(full_run / "export", dtype=torch.float32).eval()
    assert model.config.num_hidden_layers == spec["model"]["num_layers"] == len(model.model.layers) == 4
    assert model.config.hidden_size == 64 and model.config.vocab_size == 512
    assert model.config.num_key_value_heads == 2
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == [0, 1, 2, 3]
    assert not any("lora" in k or ".base." in k for k in model.state_dict())

    # The export is the trained model: its perplexity on the validation set equals the runtime's last eval.
    data = Data.model_validate(spec["data"])
    monkeypatch.chdir(full_run)  # the stages ran from here: the relative [data] cache_dir is under it
    blocks = open_prepared(full_run, data, spec["model"]["seq_len"]).validation["play"]
    world = manifest["spec"]["launch"]["nproc_per_node"]
    total, count = 0.0, 0
    with torch.no_grad():
        for rank in range(world):
            for batch in iter_eval_batches(blocks, 2, rank, world, spec["eval"]["max_tokens"]):
                x = torch.from_numpy(batch)
                logits = model(input_ids=x).logits
                assert torch.isfinite(logits).all()
                n = x.shape[0] * (x.shape[1] - 1)
                total += model(input_ids=x, labels=x).loss.item() * n
                count += n
    ppl = math.exp(total / count)
    last_eval = _events(read_metrics(full_run), "eval", 2)[-1]
    assert ppl == pytest.approx(last_eval["ppl_play"], rel=1e-3)


def test_fsdp_two_ranks_match_one_rank(full_run, make_run):
    """Same global batch (1 rank x 2 micro-batches of 2 vs 2 ranks x 2): same samples, same losses, same weights.

    The tolerance is a few times the float reordering noise measured between the two layouts (max
    |diff| 6.6e-6 over 18 steps with the chunked loss); a gradient summed where it should be averaged (over micro-batches or
    ranks) moves the weights by ~8e-3, and a logged loss summed over ranks doubles it.
    """
    from stepc.runtime.data.sampler import BlockSampler

    one = make_run.compile("rt", train={"micro_batch_size": 2}, launch={"nproc_per_node": 1})  # grad_accum 2
    spec = json.loads((one / "manifest.json").read_text())["spec"]
    two_spec = json.loads((full_run / "manifest.json").read_text())["spec"]
    assert spec["data"] == two_spec["data"] and spec["model"] == two_spec["model"]
    assert spec["train"] == two_spec["train"]

    # The sampler hands out the same global samples per optimizer step for both layouts.
    sampler = BlockSampler(np.zeros((1000, 1), np.int32), seed=7, indices=np.arange(3, 990))
    for step in range(40):
        single = sampler.block_ids(step, 0, 0, 1, 4, 1)
        pair = np.concatenate([sampler.block_ids(step, 0, rank, 2, 2, 1) for rank in range(2)])
        assert np.array_equal(single, pair)
        accum = np.concatenate([sampler.block_ids(step, m, 0, 1, 2, 2) for m in range(2)])
        assert np.array_equal(single, accum)

    check_ok(run_stage(one, 1, nproc=1))
    a = load_weights(one / "checkpoints" / "stage-1" / "final")
    b = load_weights(full_run / "checkpoints" / "stage-1" / "final")
    assert sorted(a) == sorted(b)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=2e-5, msg=lambda m, key=key: f"{key}: {m}")
    losses = [{m["step"]: m["loss"] for m in _events(read_metrics(run), "train", 1)} for run in (one, full_run)]
    assert losses[0].keys() == losses[1].keys() and len(losses[0]) >= 2
    for step, loss in losses[0].items():
        assert loss == pytest.approx(losses[1][step], rel=1e-6), (step, loss, losses[1][step])
    # and training moved them (two untrained models would match vacuously)
    from eager_reference import fresh_model
    from stepc.schema.manifest import load_manifest

    typed = load_manifest(one).spec
    init = fresh_model(typed, 2, typed.experiment.seed).state_dict()
    assert not torch.allclose(init["model.layers.0.mlp.up_proj.weight"], a["model.layers.0.mlp.up_proj.weight"], atol=1e-3)


def _tamper(run_dir):
    path = run_dir / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["spec"]["train"]["lr"] = 1e-2
    path.write_text(json.dumps(manifest, indent=1))


def test_tampered_manifest_exits_2_naming_stepc_verify(make_run):
    run_dir = make_run.compile("rt")
    _tamper(run_dir)
    proc = run_stage(run_dir, 1, timeout=60)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "stepc verify" in proc.stderr and "--allow-edited-manifest" in proc.stderr
    assert not (run_dir / "checkpoints").exists() and not (run_dir / "metrics.jsonl").exists()


def test_allow_edited_manifest_is_accepted(full_run, tmp_path):
    run_dir = tmp_path / "copy"
    shutil.copytree(full_run, run_dir, ignore=shutil.ignore_patterns("step-*", "cache"))
    _tamper(run_dir)
    assert run_stage(run_dir, 1, timeout=60).returncode == 2
    proc = check_ok(run_stage(run_dir, 1, "--allow-edited-manifest", nproc=1, timeout=120))
    assert "already complete" in proc.stdout


def test_a_finished_stage_starts_no_torchrun(full_run, tmp_path):
    """Rerunning a finished stage (stepc run of a finished run, a requeued job) is a quick check: the
    stage script's preflight says the stage is complete and no launcher or worker is started."""
    run_dir = tmp_path / "copy"
    shutil.copytree(full_run, run_dir, ignore=shutil.ignore_patterns("step-*", "cache"))
    calls = tmp_path / "python-calls"
    wrapper = tmp_path / "python"
    wrapper.write_text(f'#!/bin/bash\necho "$*" >> {calls}\nexec {sys.executable} "$@"\n')
    wrapper.chmod(0o755)
    env = {**stage_env(), "PYTHON": str(wrapper)}
    for stage in (1, 2):
        proc = subprocess.run(["bash", str(run_dir / f"stage-{stage}.sh")], env=env, cwd=run_dir, capture_output=True,
                              text=True, timeout=120)
        assert proc.returncode == 0 and f"stage {stage} is already complete" in proc.stdout, proc.stderr[-2000:]
    invoked = calls.read_text().splitlines()
    assert invoked and not any("stepc.runtime.launch" in line for line in invoked), invoked


def test_stage2_before_stage1_exits_2(make_run):
    run_dir = make_run.compile("rt")
    proc = run_stage(run_dir, 2, timeout=60)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "stage 1 to finish first" in proc.stderr and "stage-1.sh" in proc.stderr
    assert not (run_dir / "checkpoints" / "stage-2").exists()
