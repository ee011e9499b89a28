"""Stacking operators (G_stack "stack", MIDAS "stack-middle") and the LLaMA-Pro recipe, on a real LlamaForCausalLM.

Placement tests say, for every layer of the grown model, which old layer's weights it holds (exactly);
function-preservation tests compare logits before and after growth where the operator promises it (fpi).
"""

from __future__ import annotations

import pytest
import torch
from test_growth import ids, layer_params, tiny_model

from stepc.runtime.model.growth import grow_layers, plan_insertion, stack_plan


def grown_sources(before: list[dict[str, torch.Tensor]], model) -> list[int | None]:
    """For each layer of the grown model, the old layer whose weights it equals bit for bit (None: no match)."""
    out = []
    for layer in model.model.layers:
        now = layer_params(layer)
        match = [j for j, old in enumerate(before) if all(torch.equal(now[k], old[k]) for k in old)]
        assert len(match) <= 1, "perturbed layers are distinct, so at most one old layer can match"
        out.append(match[0] if match else None)
    return out


# --------------------------------------------------------------------------- the placement rule itself


def test_stack_plan_top_block_whole_model_and_repeats():
    assert stack_plan(6, 2, "stack") == (5, [4, 5])  # the top 2 layers, above the top
    assert stack_plan(6, 6, "stack") == (5, [0, 1, 2, 3, 4, 5])  # G_stack: the whole model once more
    assert stack_plan(3, 6, "stack") == (2, [0, 1, 2, 0, 1, 2])  # stacked three times
    assert stack_plan(3, 4, "stack") == (2, [0, 1, 2, 0])  # last repetition cut short
    assert stack_plan(6, 4, "stack", block=2) == (5, [4, 5, 4, 5])  # a fixed block, repeated
    assert stack_plan(6, 0, "stack") == (5, [])


def test_stack_middle_plan_middle_block_inserted_above_it():
    assert stack_plan(6, 2, "stack-middle") == (3, [2, 3])  # middle of 0..5 is 2,3; the run goes after 3
    assert stack_plan(7, 2, "stack-middle") == (3, [2, 3])  # odd leftover: the extra layer stays above
    assert stack_plan(8, 4, "stack-middle", block=2) == (4, [3, 4, 3, 4])
    assert stack_plan(4, 4, "stack-middle") == stack_plan(4, 4, "stack")  # a whole-model block is G_stack


@pytest.mark.parametrize("args", [(4, 2, "stack", 5), (4, 2, "stack", 0), (0, 1, "stack", None),
                                  (4, -1, "stack-middle", None), (4, 2, "interpolation-copy", None)])
def test_stack_plan_rejects_bad_arguments(args):
    with pytest.raises(ValueError):
        stack_plan(*args)


def test_spread_position_is_llama_pro_grouping():
    # LLaMA-Pro 32 -> 40: eight groups of four, one new block after each group (after old 3, 7, ..., 31).
    assert plan_insertion(32, 8, "spread", 0) == [3, 7, 11, 15, 19, 23, 27, 31]
    assert plan_insertion(7, 3, "spread", 0) == [1, 3, 6]  # uneven groups 2, 2, 3
    assert plan_insertion(4, 4, "spread", 0) == [0, 1, 2, 3]


# --------------------------------------------------------------------------- weights in the grown model


@pytest.mark.parametrize("operator,num_old,num_new,block,expected", [
    # grown layer i holds old layer expected[i]
    ("stack", 4, 4, None, [0, 1, 2, 3, 0, 1, 2, 3]),
    ("stack", 4, 2, None, [0, 1, 2, 3, 2, 3]),
    ("stack", 2, 5, None, [0, 1, 0, 1, 0, 1, 0]),
    ("stack", 4, 3, 1, [0, 1, 2, 3, 3, 3, 3]),
    ("stack-middle", 5, 2, None, [0, 1, 2, 1, 2, 3, 4]),
    ("stack-middle", 6, 4, 2, [0, 1, 2, 3, 2, 3, 2, 3, 4, 5]),
    ("stack-middle", 3, 3, None, [0, 1, 2, 0, 1, 2]),
])
def test_stacking_places_copies_of_the_right_layers(operator, num_old, num_new, block, expected):
    model = tiny_model(num_old)
    before = [layer_params(layer) for layer in model.model.layers]
    old_modules = list(model.model.layers)
    new = grow_layers(model, num_new, operator, "upper", fpi=False, seed=0, block=block)
    assert grown_sources(before, model) == expected
    assert len(new) == num_new and model.config.num_hidden_layers == num_old + num_new
    # old layers keep identity and order; the rest are fresh modules with storage of their own
    kept = [m for i, m in enumerate(model.model.layers) if i not in new]
    assert all(a is b for a, b in zip(kept, old_modules, strict=True))
    ptrs = [layer.mlp.up_proj.weight.data_ptr() for layer in model.model.layers]
    assert len(set(ptrs)) == len(ptrs)
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == list(range(num_old + num_new))


def test_stacking_ignores_position_and_seed():
    a, b = tiny_model(5), tiny_model(5)
    grow_layers(a, 3, "stack-middle", "lower", fpi=False, seed=1)
    grow_layers(b, 3, "stack-middle", "random", fpi=False, seed=99)
    for la, lb in zip(a.model.layers, b.model.layers, strict=True):
        pa, pb = layer_params(la), layer_params(lb)
        assert all(torch.equal(pa[k], pb[k]) for k in pa)


def test_stacking_without_fpi_changes_the_function():
    model = tiny_model(3)
    x = ids()
    with torch.no_grad():
        before = model(x).logits
    grow_layers(model, 2, "stack", "upper", fpi=False, seed=0)
    with torch.no_grad():
        assert not torch.allclose(before, model(x).logits)  # the copies on top run


def test_stacking_layer_types_follow_the_copied_layers():
    model = tiny_model(3)
    model.config.layer_types = ["full_attention", "sliding_attention", "full_attention"]
    grow_layers(model, 2, "stack", "upper", fpi=False, seed=0)  # copies of old 1 and 2 on top
    assert model.config.layer_types == ["full_attention", "sliding_attention", "full_attention",
                                        "sliding_attention", "full_attention"]


@pytest.mark.parametrize("operator,num_new,block", [("stack", 4, None), ("stack", 6, 2), ("stack-middle", 2, None),
                                                    ("stack-middle", 3, 1)])
def test_stacking_with_fpi_preserves_logits(operator, num_new, block):
    model = tiny_model(4)
    x = ids()
    with torch.no_grad():
        before = model(x).logits
    new = grow_layers(model, num_new, operator, "upper", fpi=True, seed=0, block=block)
    for i in new:
        layer = model.model.layers[i]
        assert not layer.self_attn.o_proj.weight.any() and not layer.mlp.down_proj.weight.any()
        assert layer.self_attn.q_proj.weight.any()
    with torch.no_grad():
        assert torch.equal(before, model(x).logits)


# --------------------------------------------------------------------------- LLaMA-Pro block expansion


def test_llama_pro_block_expansion_recipe():
    """interpolation-copy + fpi + spread = LLaMA-Pro: 8 layers in 4 groups of 2, each followed by a zero-output copy
    of the group's last layer; the expanded model computes the same logits (and the same under the KV cache)."""
    model = tiny_model(8, attn="sdpa")
    before = [layer_params(layer) for layer in model.model.layers]
    x = ids(length=6)
    with torch.no_grad():
        logits = model(x).logits
    new = grow_layers(model, 4, "interpolation-copy", "spread", fpi=True, seed=0)
    assert new == [2, 5, 8, 11]
    zeroed = ("self_attn.o_proj.weight", "mlp.down_proj.weight")
    for pos, src in zip(new, [1, 3, 5, 7], strict=True):
        now = layer_params(model.model.layers[pos])
        for k, v in before[src].items():
            assert torch.equal(now[k], torch.zeros_like(v) if k in zeroed else v), (pos, k)
    old_at = [i for i in range(12) if i not in new]
    for j, i in enumerate(old_at):
        now = layer_params(model.model.layers[i])
        assert all(torch.equal(now[k], before[j][k]) for k in now)
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, logits, rtol=0, atol=1e-12)
    from test_growth import incremental_logits

    torch.testing.assert_close(incremental_logits(model, x), logits, rtol=0, atol=1e-10)
