"""Tied embeddings (`model.tie_embeddings = true`) through both stages on 1 rank (the plain module)
and on 2 gloo ranks (FSDP2): the measured model-state bytes (every parameter, gradient and AdamW
state tensor the ranks hold) equal the compiler's exact prediction in every stage, the export keeps
one shared matrix, and `stepc eval` of the export reproduces the runtime's own last evaluation (on
one rank `to_empty` once untied the head: it trained apart and the export, which saves the
embedding once, scored perplexity ~2900 where the runtime measured ~80). The same two runs check
ReLoRA's merge on the running runtime's own optimizer (RESET below), so it costs no launch of its own.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import check_ok, read_metrics, run_stage


# ReLoRA's merge on the running runtime's own optimizer: the plain module zeroes the adapters' moments,
# FSDP2 prunes them by magnitude, shard by shard (step.optimizer_reset); the checkpoint at the merge step
# (step 9 of stage 2's 10, checkpoint_every = relora_reset_every = 9) holds the state right after it.
# Stage 1 has 9 steps: it ends at 9 and writes no periodic checkpoint.
EVERY = 9
RESET = {1: {"optimizer_reset": "zero", "relora_reset_every": EVERY},
         2: {"optimizer_reset": "magnitude", "prune_ratio": 0.75, "relora_reset_every": EVERY}}


@pytest.mark.parametrize("nproc", [1, 2])
def test_tied_model_measured_state_bytes_equal_the_prediction(make_run, tmp_path, nproc):
    run_dir = make_run.compile(f"tied{nproc}", model={"tie_embeddings": True}, step=RESET[nproc],
                               train={"reference_steps": 12, "warmup_steps": 2, "checkpoint_every": EVERY},
                               eval={"every_steps": 100, "max_tokens": 512}, launch={"nproc_per_node": nproc})
    for stage in (1, 2):
        check_ok(run_stage(run_dir, stage))
    _adapter_state_right_after_the_merge(run_dir, tmp_path, nproc)
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["spec"]["model"]["tie_embeddings"] is True
    metrics = read_metrics(run_dir)
    world = manifest["spec"]["launch"]["nproc_per_node"]
    for info in manifest["plan"]["stages"]:
        i = info["index"]
        train = [m for m in metrics if m["event"] == "train" and m["stage"] == i]
        assert train, f"no train metrics for stage {i}"
        (start,) = [m for m in metrics if m["event"] == "stage_start" and m["stage"] == i]
        # the runtime adds one 4-byte AdamW step scalar per trainable tensor for each extra rank
        trainable_tensors = (info["new_layers"] * 9 + (info["total_layers"] - info["new_layers"]) * 14
                             + 2)  # 7 maps + 2 norms per new layer, A and B on 7 maps per old one, tied embedding + final norm
        assert start["predicted_model_state_bytes"] == info["exact_model_state_bytes"] + 4 * trainable_tensors * (world - 1)
        for record in train:
            assert record["model_state_bytes"] == start["predicted_model_state_bytes"], (i, record)

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(run_dir / "export")
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()

    from stepc.commands.evaluate import evaluate_run

    (last,
     ) = [m for m in metrics if m["event"] == "eval" and m["stage"] == 2 and m["step"] == manifest["plan"]["stages"][1]["steps"]]
    scored = evaluate_run(run_dir, [], None, None)["perplexity"]
    assert scored["heldout"] == pytest.approx(last["ppl_heldout"], rel=1e-3), (scored, last)


def _adapter_state_right_after_the_merge(run_dir, tmp_path, nproc):
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    manifest = json.loads((run_dir / "manifest.json").read_text())
    every = manifest["spec"]["step"]["relora_reset_every"]
    assert manifest["plan"]["stages"][0]["steps"] == every < manifest["plan"]["stages"][1]["steps"]
    assert [m["step"] for m in read_metrics(run_dir) if m["event"] == "merge"] == [every]
    dcp_to_torch_save(run_dir / "checkpoints" / "stage-2" / f"step-{every:08d}", tmp_path / "merge.pt")
    state = torch.load(tmp_path / "merge.pt", weights_only=False)["optim"]["state"]
    adapters = [name for name in state if ".lora_" in name]
    assert len(adapters) == 2 * 7 * manifest["plan"]["stages"][1]["frozen_layers"]
    keep = 1 - manifest["spec"]["step"]["prune_ratio"] if nproc == 2 else 0.0
    for name in adapters:
        assert float(state[name]["step"]) == every  # ReLoRA keeps counting: only the moments are reset
        for key in ("exp_avg", "exp_avg_sq"):
            kept = int(state[name][key].count_nonzero())
            # each of the `nproc` shards keeps round(keep x its size): the whole is within nproc / 2 of that
            assert abs(kept - keep * state[name][key].numel()) <= nproc / 2, (name, key, kept)
    norms = [name for name in state if "norm" in name]  # the rest of the optimizer is untouched: every
    assert "model.norm.weight" in norms  # element of a norm weight has a gradient, so nothing is zero
    for name in norms:
        assert all(state[name][key].count_nonzero() == state[name][key].numel() for key in ("exp_avg", "exp_avg_sq")), name
