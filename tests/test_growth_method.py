"""method = "growth": staged growth that trains the whole grown model (G_stack / MIDAS / LLaMA-Pro as published),
with its optimizer state carried across a growth that renumbers layers (real torchrun, 2 FSDP2 ranks)."""

from __future__ import annotations

import json
import re
import subprocess

import torch
from conftest import STAGE_TIMEOUT, check_ok, load_weights, read_metrics, run_stage, spec_text, stage_env
from test_grow_at_tokens import BATCH, REF, D, L, P, R, tables
from test_growth_spec import compile_doc, with_
from test_optimizer_carry import _dcp_state, assert_measured_is_predicted

from stepc.compiler.load import parse_spec
from stepc.compiler.plan import make_plan

GROWTH_TABLES = tables("g", growth_operator="stack")
GROWTH_TABLES["experiment"]["method"] = "growth"
GROWTH_SPEC = spec_text(GROWTH_TABLES)


def test_growth_plan_trains_every_layer_at_vanilla_cost_per_layer():
    plan = make_plan(parse_spec(GROWTH_SPEC, "g.toml")).model_dump()
    budget = 6 * L * P * REF * BATCH
    s1 = round(0.75 * REF)
    c1 = 6 * 3 * P * BATCH * s1
    s2 = (budget - c1) // (6 * 6 * P * BATCH)
    one, two = plan["stages"]
    assert (one["trainable_params"], one["frozen_params"], one["frozen_layers"], one["steps"]) == (3 * P, 0, 0, s1)
    assert (two["trainable_params"], two["frozen_params"], two["frozen_layers"], two["steps"]) == (6 * P, 0, 0, s2)
    assert two["peak_bytes"] == 16 * 6 * P == plan["vanilla_peak_bytes"] == plan["peak_bytes"]  # Eq. 1
    assert one["peak_bytes"] == 16 * 3 * P


def test_growth_needs_pinned_layers(tmp_path, capsys):
    code, err, _ = compile_doc(tmp_path, with_(experiment={"method": "growth"}), capsys)
    assert code == 2 and "[memory.layers]" in err and "pin the layers" in err, err


def test_stack_middle_growth_carries_renumbered_layer_moments_bit_for_bit(make_run, tmp_path):
    run_dir = make_run.compile("grow", experiment={"method": "growth"}, model={"num_layers": 5},
                               memory={"layers": [3, 2]}, train={"checkpoint_every": 100},
                               step={"growth_operator": "stack-middle", "carry_optimizer_state": True})
    plan = json.loads((run_dir / "manifest.json").read_text())["plan"]
    check_ok(run_stage(run_dir, 1))
    steps1 = plan["stages"][0]["steps"]
    dump = tmp_path / "start.pt"
    env = {**stage_env(), "STEPC_DUMP_OPTIMIZER_AT_START": str(dump)}
    check_ok(subprocess.run(["bash", str(run_dir / "stage-2.sh")], check=False, env=env, cwd=run_dir,
                            capture_output=True, text=True, timeout=STAGE_TIMEOUT))

    # stack-middle of 3 layers with 2 new: block = layers 0, 1, copied above layer 1 -> old 2 becomes layer 4
    previous = _dcp_state(run_dir / "checkpoints" / "stage-1" / f"step-{steps1:08d}", tmp_path)["optim"]["state"]
    start = torch.load(dump, weights_only=False)
    layers = lambda names: sorted({int(m.group(1)) for n in names if (m := re.search(r"layers\.(\d+)\.", n))})
    assert layers(start) == [0, 1, 4] and layers(previous) == [0, 1, 2]
    renamed = {n.replace("layers.4.", "layers.2."): state for n, state in start.items()}
    assert sorted(renamed) == sorted(previous)  # every parameter of stage 1 carried, new layers 2 and 3 empty
    for name, state in renamed.items():
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(state[key], previous[name][key]), (name, key)
    assert float(start["model.layers.4.mlp.up_proj.weight"]["step"]) == steps1
    assert plan["stages"][1]["carried_optimizer_params"] > plan["stages"][1]["trainable_params"] // 2

    # and the whole grown model trained in stage 2: every layer of the export moved away from its stage-1 source
    stage1, final = load_weights(run_dir / "checkpoints" / "stage-1" / "final"), load_weights(run_dir / "export")
    for grown, source in [(0, 0), (1, 1), (2, 0), (3, 1), (4, 2)]:
        key = "model.layers.{}.mlp.up_proj.weight"
        assert not torch.equal(final[key.format(grown)], stage1[key.format(source)]), grown
    assert not [m for m in read_metrics(run_dir) if m["event"] == "merge"]  # no adapters anywhere
    assert_measured_is_predicted(run_dir, plan)  # the whole model's states, as the plan counts them
