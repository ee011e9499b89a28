"""Optimizer-state carry across growth (step.carry_optimizer_state), with real torchrun + FSDP2 on 2 gloo ranks.

The surviving parameters' AdamW moments and step counts at the start of stage 2 must equal stage 1's
final ones bit for bit; new layers and adapters start with no state; frozen layers hold none.
"""

from __future__ import annotations

import json
import subprocess

import torch
from conftest import STAGE_TIMEOUT, check_ok, read_metrics, run_stage, stage_env
from test_growth import tiny_model

from stepc.runtime.model.carry import carry_names
from stepc.runtime.model.growth import grow_layers
from stepc.runtime.model.lora import apply_adapters


def _dcp_state(checkpoint, tmp_path):
    """A DCP checkpoint as plain tensors, read without a process group."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dest = tmp_path / f"{checkpoint.parent.name}-{checkpoint.name}.pt"
    dcp_to_torch_save(checkpoint, dest)
    return torch.load(dest, weights_only=False)


def assert_measured_is_predicted(run_dir, plan) -> None:
    """The memory model holds with carry on: every measured model-state byte count equals the compiler's."""
    metrics = read_metrics(run_dir)
    for info in plan["stages"]:
        train = [m for m in metrics if m["event"] == "train" and m["stage"] == info["index"]]
        assert train and all(m["model_state_bytes"] == m["predicted_model_state_bytes"] for m in train)
        assert 0 <= train[0]["predicted_model_state_bytes"] - info["exact_model_state_bytes"] < 4 * 200


def test_carry_names_follow_renumbered_layers_on_a_real_model():
    """Every name that carry maps across a growth points at the very tensor it was before (layers renumbered)."""
    model = tiny_model(4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    new = grow_layers(model, 3, "stack-middle", "upper", fpi=False, seed=0)  # inserted mid-stack: upper layers move
    apply_adapters(model, [i for i in range(7) if i not in new], 2, 4.0, torch.Generator().manual_seed(0))
    for p in model.parameters():  # as if every old layer stayed trainable (full-model growth)
        p.requires_grad_(True)
    names = carry_names([n for n, _ in model.named_parameters()], new, 7)
    after = dict(model.named_parameters())
    moved = 0
    for now, then in names.items():
        assert torch.equal(after[now].detach(), before[then.replace(".base.", ".")]), (now, then)
        moved += now != then
    assert moved > 0  # layers above the insertion were renumbered
    assert not [n for n in names if any(f"layers.{i}." in n for i in new)]  # new layers start empty
    assert not [n for n in names if "lora_" in n]  # re-initialised adapters start empty
    assert {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"} <= set(names)


def test_carried_moments_equal_previous_stage_bit_for_bit(make_run, tmp_path):
    run_dir = make_run.compile("carry", step={"carry_optimizer_state": True, "growth_operator": "stack"},
                               train={"checkpoint_every": 100})  # no periodic checkpoints: only the final one
    plan = json.loads((run_dir / "manifest.json").read_text())["plan"]
    assert [s["carried_optimizer_params"] for s in plan["stages"]] == [0, 512 * 64 * 2 + 64]
    check_ok(run_stage(run_dir, 1))
    steps1 = plan["stages"][0]["steps"]
    final = run_dir / "checkpoints" / "stage-1" / f"step-{steps1:08d}"
    assert (final / "COMPLETE").is_file()  # written at the last step because stage 2 carries from it

    # without stage 1's final checkpoint stage 2 refuses to start (rather than silently not carrying)
    hidden = final.with_name("hidden")
    final.rename(hidden)
    refused = run_stage(run_dir, 2)
    hidden.rename(final)
    assert refused.returncode == 2 and "carry_optimizer_state needs stage 1's checkpoint" in refused.stderr, refused.stderr
    assert "torchrun" not in refused.stderr  # refused by the stage script's preflight, before any worker started

    dump = tmp_path / "start.pt"
    env = {**stage_env(), "STEPC_DUMP_OPTIMIZER_AT_START": str(dump)}
    proc = check_ok(subprocess.run(["bash", str(run_dir / "stage-2.sh")], check=False, env=env, cwd=run_dir,
                                   capture_output=True, text=True, timeout=STAGE_TIMEOUT))
    assert "carried the AdamW state of 3 parameter tensors" in proc.stdout

    previous = _dcp_state(final, tmp_path)["optim"]["state"]
    start = torch.load(dump, weights_only=False)
    assert sorted(start) == ["lm_head.weight", "model.embed_tokens.weight", "model.norm.weight"]
    for name, state in start.items():
        assert set(state) == {"step", "exp_avg", "exp_avg_sq"}
        for key, value in state.items():
            saved = previous[name][key]
            assert value.dtype == saved.dtype and torch.equal(value, saved), (name, key)
        assert float(state["step"]) == steps1
        assert state["exp_avg_sq"].abs().sum() > 0  # real moments, not a fresh start

    (event,) = [m for m in read_metrics(run_dir) if m["event"] == "optimizer_carry"]
    assert event["stage"] == 2 and sorted(event["carried"]) == sorted(start)
    assert [m for m in read_metrics(run_dir) if m["event"] == "stage_end" and m["stage"] == 2]
    assert_measured_is_predicted(run_dir, plan)


def test_carried_state_is_created_where_adamw_itself_creates_it(monkeypatch):
    """The state a carry creates (then fills from the checkpoint) has the device, dtype and shape of
    each entry that AdamW's own first step gives, for both kernels the runtime uses: fused (on a GPU
    it reads `step` through a device pointer, so a CPU `step` is an illegal memory access at stage
    2's first step) and foreach. The parameters live on the meta device, where a tensor made on the
    CPU instead of the parameter's device is a visible mismatch (on a CPU-only machine both would be
    CPU). AdamW refuses fused on meta by a device whitelist checked just before it creates the state;
    the test lifts only that check, so the reference is AdamW's own state-creation code."""
    import importlib

    from stepc.runtime.model.carry import empty_state

    adam = importlib.import_module("torch.optim.adam")  # torch.optim deletes its submodules' names
    monkeypatch.setattr(adam, "_device_dtype_check_for_fused", lambda *a, **k: None)
    for kernel in ({"fused": True}, {"foreach": True}):
        params = [torch.nn.Parameter(torch.empty(s, device="meta")) for s in ((6, 4), (4,))]
        reference = torch.optim.AdamW(params, **kernel)
        for p in params:
            p.grad = torch.empty_like(p)
        reference.step()  # AdamW creates its state (meta kernels: shapes and devices only)
        ours = torch.optim.AdamW(params, **kernel)
        for p in params:
            made, expected = empty_state(ours, p), reference.state[p]
            assert made.keys() == expected.keys(), kernel
            for key in expected:
                assert (made[key].device, made[key].dtype, made[key].shape) == \
                       (expected[key].device, expected[key].dtype, expected[key].shape), (kernel, key)
