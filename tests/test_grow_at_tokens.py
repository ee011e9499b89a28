"""step.grow_at_tokens: growth timed by cumulative training tokens instead of grow_at fractions.

Expected schedules are written out from Appendix E (C = 6 N T; frozen parameters 2 FLOPs per token) and
Eq. 4/5 (P_layer = 12 d^2 + 2 d, E = 19 r d) here, independently of stepc/schedule.py.
"""

from __future__ import annotations

import pytest
from conftest import spec_text
from test_growth_spec import compile_doc, with_

from stepc.compiler.load import parse_spec
from stepc.compiler.plan import make_plan

D, R, L, REF, BATCH = 128, 16, 6, 300, 1024
P, E = 12 * D * D + 2 * D, 19 * R * D


def tables(name: str = "tokens", **step) -> dict[str, dict]:
    """A planning-only spec: L layers of width D in two stages, ReLoRA rank R (``step`` keys added)."""
    return {
        "experiment": {"name": name},
        "model": {"hidden_size": D, "num_layers": L, "num_attention_heads": 4, "vocab_size": 4096, "seq_len": 128},
        "memory": {"accounting": "paper", "layers": step.pop("layers", [3, 3])},
        "step": {"lora_rank": R, **step},
        "train": {"reference_steps": REF, "global_batch_tokens": BATCH, "micro_batch_size": 4, "warmup_steps": 10},
        "data": {"tokenizer": "bpe-4096"},
        "launch": {"nproc_per_node": 2},
    }


def plan_for(**step) -> dict:
    return make_plan(parse_spec(spec_text(tables(**step)), "tokens.toml")).model_dump()


def test_two_stages_grow_after_the_given_tokens():
    tokens = 100_000  # 97.66 batches: growth after 97 whole steps
    plan = plan_for(grow_at_tokens=[tokens])
    s1 = 97
    budget = 6 * L * P * REF * BATCH
    c1 = 6 * (3 * P) * BATCH * s1
    per_step2 = (6 * (3 * P + 3 * E) + 2 * (3 * P)) * BATCH
    s2 = (budget - c1) // per_step2
    one, two = plan["stages"]
    assert (one["steps"], one["tokens"], one["flops"], one["nominal_steps"]) == (s1, s1 * BATCH, c1, REF)
    assert (two["steps"], two["tokens"], two["flops"], two["nominal_steps"]) == (s2, s2 * BATCH, s2 * per_step2, s2)
    assert two["data_step_offset"] == s1
    assert plan["flops_budget"] == budget
    spent = c1 + s2 * per_step2
    assert spent <= budget < spent + per_step2  # within the budget, and no whole step of it left unused


def test_three_stages_counts_are_cumulative_and_a_long_stage_stretches_its_cosine():
    plan = plan_for(layers=[2, 2, 2], grow_at_tokens=[400 * BATCH + 5, 450 * BATCH])
    steps = [400, 50]
    assert [s["steps"] for s in plan["stages"][:2]] == steps
    assert plan["stages"][0]["nominal_steps"] == 400  # past reference_steps: the cosine spans the whole stage
    assert plan["stages"][1]["nominal_steps"] == REF
    budget = 6 * L * P * REF * BATCH
    spent = 6 * 2 * P * BATCH * 400 + (6 * (2 * P + 2 * E) + 2 * 2 * P) * BATCH * 50
    per_step3 = (6 * (2 * P + 4 * E) + 2 * 4 * P) * BATCH
    assert plan["stages"][2]["steps"] == (budget - spent) // per_step3
    assert [s["data_step_offset"] for s in plan["stages"]] == [0, 400, 450]


def test_same_schedule_as_the_equivalent_fraction():
    """grow_at = 0.5 of 300 reference steps and growing after 150 batches are the same run."""
    assert plan_for(grow_at_tokens=[150 * BATCH])["stages"] == plan_for(grow_at=0.5)["stages"]


@pytest.mark.parametrize("step,memory,words", [
    ({"grow_at_tokens": [10_000_000]}, {}, "the last stage gets no steps"),  # over the FLOPs budget
    ({"grow_at_tokens": [50_000], "grow_at": 0.5}, {}, "both set the growth times"),
    ({"grow_at_tokens": [50_000, 60_000]}, {}, "2 growth times for 1 growths"),
    ({"grow_at_tokens": [60_000, 50_000]}, {"stages": 3}, "not strictly increasing"),
    ({"grow_at_tokens": [50_000, 50_100]}, {"stages": 3}, "rounds down to the optimizer steps [48, 48]"),
    ({"grow_at_tokens": [100]}, {}, "less than one optimizer step"),
])
def test_bad_growth_times_exit_2_naming_the_key(tmp_path, capsys, step, memory, words):
    doc = with_(step={"grow_at": None, **step}, memory={"stages": 2, **memory})  # BASE sets grow_at
    code, err, run_dir = compile_doc(tmp_path, doc, capsys)
    assert code == 2, err
    assert "[step.grow_at_tokens]" in err and words in err and "Traceback" not in err, err
    assert not run_dir.exists()
