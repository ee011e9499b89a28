"""Tied embeddings (`model.tie_embeddings = true`) through both stages on 1 rank (the plain module)
and on 2 gloo ranks (FSDP2): the measured model-state bytes (every parameter, gradient and AdamW
state tensor the ranks hold) equal the compiler's exact prediction in every stage, the export keeps
one shared matrix, and `stepc eval` of the export reproduces the runtime's own last evaluation (on
one rank `to_empty` once untied the head: it trained apart and the export, which saves the
embedding once, scored perplexity ~2900 where the runtime measured ~80).
"""

from __future__ import annotations

import json

import pytest
from conftest import check_ok, read_metrics, run_stage


@pytest.mark.parametrize("nproc", [1, 2])
def test_tied_model_measured_state_bytes_equal_the_prediction(make_run, nproc):
    run_dir = make_run.compile(f"tied{nproc}", model={"tie_embeddings": True},
                               train={"reference_steps": 12, "warmup_steps": 2, "checkpoint_every": 100},
                               eval={"every_steps": 100, "max_tokens": 512}, launch={"nproc_per_node": nproc})
    for stage in (1, 2):
        check_ok(run_stage(run_dir, stage))
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

    (last,) = [m for m in metrics if m["event"] == "eval" and m["stage"] == 2 and m["step"] == manifest["plan"]["stages"][1]["steps"]]
    scored = evaluate_run(run_dir, [], None, None)["perplexity"]
    assert scored["heldout"] == pytest.approx(last["ppl_heldout"], rel=1e-3), (scored, last)
