"""All stages of a STEP run through `stepc run` (2 gloo ranks): growth, ReLoRA merges, frozen layers, export."""

from __future__ import annotations

import json
import re

import numpy as np
import torch
from conftest import first_batch_prefix, load_weights, read_metrics


def _manifest(run_dir):
    return json.loads((run_dir / "manifest.json").read_text())


def _dcp_model_state(checkpoint, tmp_path):
    """The model part of a DCP checkpoint, read without a process group."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dest = tmp_path / f"{checkpoint.parent.name}-{checkpoint.name}.pt"
    dcp_to_torch_save(checkpoint, dest)
    return torch.load(dest, weights_only=False)["model"]


def test_every_stage_ran_and_finished(full_run):
    metrics = read_metrics(full_run)
    stages = _manifest(full_run)["plan"]["stages"]
    assert [m["stage"] for m in metrics if m["event"] == "stage_end"] == [s["index"] for s in stages]
    for info in stages:
        (start,) = [m for m in metrics if m["event"] == "stage_start" and m["stage"] == info["index"]]
        assert start["layers"] == info["total_layers"]
        last = [m for m in metrics if m["event"] == "train" and m["stage"] == info["index"]][-1]
        assert last["step"] == info["steps"]


def test_each_stage_reads_on_where_the_previous_stopped(full_run, monkeypatch):
    """Each rank's first micro-batch of each stage, as the runtime trained on it (STEPC_DUMP_FIRST_BATCH),
    is the sampler's batch at the stage's data_step_offset, which is where the stages before it stopped:
    stage 2 continues the data stream instead of reading stage 1's first batches again."""
    from stepc.runtime.data.prepared import open_prepared, training_sets
    from stepc.schema.manifest import load_manifest

    manifest = load_manifest(full_run)
    spec, stages = manifest.spec, manifest.plan.stages
    assert [s.data_step_offset for s in stages] == [0, stages[0].steps]
    monkeypatch.chdir(full_run)  # the stages ran from here: the relative [data] cache_dir is under it
    prepared = open_prepared(full_run, spec.data, spec.model.seq_len)
    world, micro = spec.launch.nproc_per_node, spec.train.micro_batch_size
    accum = spec.train.global_batch_tokens // (spec.model.seq_len * micro * world)
    for stage in stages:
        sampler, _ = training_sets(prepared, spec.data.holdout_fraction, spec.experiment.seed,
                                   spec.data.weights_at(stage.index))
        for rank in range(world):
            trained = np.load(f"{first_batch_prefix(full_run)}.stage{stage.index}.rank{rank}.npy")
            assert np.array_equal(trained, sampler.batch(stage.data_step_offset, 0, rank, world, micro, accum))
            if stage.index > 1:
                assert not np.array_equal(trained, sampler.batch(0, 0, rank, world, micro, accum))


def test_final_stage_heldout_ppl_beats_stage1(full_run):
    metrics = read_metrics(full_run)
    evals = {s: [m for m in metrics if m["event"] == "eval" and m["stage"] == s] for s in (1, 2)}
    assert evals[2][-1]["ppl_heldout"] < evals[1][-1]["ppl_heldout"]
    assert evals[2][-1]["ppl_play"] < evals[1][-1]["ppl_play"]


def test_merges_happen_at_multiples_of_relora_reset_every(full_run):
    manifest = _manifest(full_run)
    every = manifest["spec"]["step"]["relora_reset_every"]
    steps2 = manifest["plan"]["stages"][1]["steps"]
    metrics = read_metrics(full_run)
    merges = [m["step"] for m in metrics if m["event"] == "merge" and m["stage"] == 2]
    assert merges == list(range(every, steps2 + 1, every)) and len(merges) >= 2
    assert not [m for m in metrics if m["event"] == "merge" and m["stage"] == 1]  # no adapters in stage 1


def test_export_has_all_layers_and_no_adapter_keys(full_run):
    weights = load_weights(full_run / "export")
    config = json.loads((full_run / "export" / "config.json").read_text())
    assert config["num_hidden_layers"] == 4
    layers = {int(k.split(".")[2]) for k in weights if k.startswith("model.layers.")}
    assert layers == {0, 1, 2, 3}
    assert not [k for k in weights if "lora" in k or ".base." in k]
    # the run's export is the last stage's final checkpoint
    final = load_weights(full_run / "checkpoints" / "stage-2" / "final")
    assert sorted(final) == sorted(weights) and all(torch.equal(final[k], weights[k]) for k in weights)


def test_frozen_base_weights_change_only_at_merges(full_run, tmp_path):
    """Stage 2 (position "upper"): the old layers' base weights equal stage 1's export until the first merge."""
    manifest = _manifest(full_run)
    assert manifest["spec"]["step"]["position"] == "upper"
    every = manifest["spec"]["step"]["relora_reset_every"]
    stage1 = load_weights(full_run / "checkpoints" / "stage-1" / "final")
    stage_dir = full_run / "checkpoints" / "stage-2"
    steps = sorted(int(p.name.split("-")[1]) for p in stage_dir.glob("step-*"))
    before = [s for s in steps if s < every]
    after = [s for s in steps if s > every]
    assert before and after, steps

    def frozen(state):
        """{stage-1 key: tensor} of the frozen layers, in layer order."""
        index = lambda key: int(re.search(r"layers\.(\d+)\.", key).group(1))  # noqa: E731
        old = sorted({index(k) for k in state if k.endswith(".base.weight")})
        assert len(old) == 2
        out = {}
        for new_index, grown_index in enumerate(old):
            for key, value in state.items():
                if re.search(rf"(^|\.)layers\.{grown_index}\.", key) and "lora_" not in key:
                    rest = key.split(f"layers.{grown_index}.", 1)[1]
                    out[f"model.layers.{new_index}." + rest.replace(".base.", ".")] = value
        return out

    early = frozen(_dcp_model_state(stage_dir / f"step-{before[-1]:08d}", tmp_path))
    late = frozen(_dcp_model_state(stage_dir / f"step-{after[0]:08d}", tmp_path))
    assert set(early) == {k for k in stage1 if k.startswith(("model.layers.0.", "model.layers.1."))}
    for key, value in early.items():
        assert torch.equal(value, stage1[key]), f"frozen {key} changed before the first merge"
    changed = [k for k in late if k.endswith("proj.weight") and not torch.equal(late[k], stage1[k])]
    assert changed, "the merge at step %d folded nothing into the frozen weights" % every
    for key in late:
        if "norm" in key:  # norms carry no adapter: frozen for the whole stage
            assert torch.equal(late[key], stage1[key]), key
