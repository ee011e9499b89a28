"""Tests for stepc.runtime.model.growth (layer insertion for LlamaForCausalLM)."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from stepc.runtime.model.growth import grow_layers, plan_insertion

POSITIONS = ["upper", "lower", "intermediate", "random"]
OPERATORS = ["interpolation-mean", "interpolation-copy"]


def tiny_model(
    num_layers: int = 4, dtype: torch.dtype = torch.float64, seed: int = 0, attn: str = "eager", **cfg
) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=32,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        vocab_size=97,
        num_hidden_layers=num_layers,
        max_position_embeddings=64,
        attn_implementation=attn,
        **cfg,
    )
    model = LlamaForCausalLM(config).to(dtype)
    # HF inits norms to 1: perturb every parameter so that "mean" vs "copy" and
    # per-layer differences are visible in every tensor, norms included.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def ids(batch: int = 2, length: int = 7, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 97, (batch, length), generator=g)


def layer_params(layer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in layer.state_dict().items()}


# --------------------------------------------------------------------------- plan


def test_plan_upper_lower_intermediate():
    assert plan_insertion(6, 2, "upper", 0) == [4, 5]
    assert plan_insertion(6, 2, "lower", 0) == [0, 1]
    assert plan_insertion(6, 2, "intermediate", 0) == [2, 3]
    assert plan_insertion(7, 3, "intermediate", 0) == [2, 3, 4]
    assert plan_insertion(4, 4, "upper", 0) == [0, 1, 2, 3]
    assert plan_insertion(5, 0, "upper", 0) == []


@pytest.mark.parametrize("position", POSITIONS)
def test_plan_more_new_than_old_is_balanced(position):
    plan = plan_insertion(3, 8, position, seed=5)
    assert plan == sorted(plan) and len(plan) == 8
    counts = [plan.count(j) for j in range(3)]
    assert sorted(counts) == [2, 3, 3]  # floor/ceil of 8/3
    assert plan_insertion(3, 8, position, seed=5) == plan  # deterministic


def test_plan_more_new_than_old_remainder_follows_position():
    assert plan_insertion(3, 4, "upper", 0) == [0, 1, 2, 2]
    assert plan_insertion(3, 4, "lower", 0) == [0, 0, 1, 2]
    assert plan_insertion(3, 6, "upper", 0) == [0, 0, 1, 1, 2, 2]


def test_plan_random_is_seeded_and_without_replacement():
    a = plan_insertion(20, 6, "random", seed=123)
    assert a == plan_insertion(20, 6, "random", seed=123)
    assert len(set(a)) == 6 and a == sorted(a) and all(0 <= j < 20 for j in a)
    others = {tuple(plan_insertion(20, 6, "random", seed=s)) for s in range(10)}
    assert len(others) > 1  # the seed matters


@pytest.mark.parametrize(
    "args",
    [(0, 1, "upper", 0), (3, -1, "upper", 0), (3, 1, "middle", 0), (3.0, 1, "upper", 0), (3, True, "upper", 0)],
)
def test_plan_rejects_bad_arguments(args):
    with pytest.raises(ValueError):
        plan_insertion(*args)


# --------------------------------------------------------------------------- growth


@pytest.mark.parametrize("operator", OPERATORS)
@pytest.mark.parametrize("position", POSITIONS)
def test_fpi_preserves_logits_exactly(operator, position):
    model = tiny_model(4)
    x = ids()
    with torch.no_grad():
        before = model(x).logits
    new = grow_layers(model, 3, operator, position, fpi=True, seed=7)
    assert len(model.model.layers) == 7 and len(new) == 3
    with torch.no_grad():
        after = model(x).logits
    assert torch.equal(before, after)


def test_without_fpi_logits_change_and_new_layers_run():
    model = tiny_model(4)
    x = ids()
    with torch.no_grad():
        before = model(x).logits
    grow_layers(model, 2, "interpolation-mean", "upper", fpi=False, seed=0)
    with torch.no_grad():
        after = model(x).logits
    # If config.num_hidden_layers were stale, LlamaModel.forward would skip the
    # top (new) layers and the logits would be unchanged.
    assert not torch.allclose(before, after)


def test_metadata_renumbered_and_config_updated():
    model = tiny_model(4)
    new = grow_layers(model, 3, "interpolation-copy", "random", fpi=False, seed=3)
    assert model.config.num_hidden_layers == 7
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == list(range(7))
    assert new == sorted(new) and len(set(new)) == 3
    assert getattr(model.config, "layer_types", None) is None  # stays unset


@pytest.mark.parametrize("position", ["upper", "lower", "intermediate"])
def test_returned_indices(position):
    model = tiny_model(4)
    old = list(model.model.layers)
    new = grow_layers(model, 2, "interpolation-copy", position, fpi=False, seed=0)
    expected = {"upper": [3, 5], "lower": [1, 3], "intermediate": [2, 4]}[position]
    assert new == expected
    # Old layers keep their order and identity; new ones are fresh modules.
    kept = [m for i, m in enumerate(model.model.layers) if i not in new]
    assert all(a is b for a, b in zip(kept, old, strict=True))
    assert all(all(model.model.layers[i] is not o for o in old) for i in new)


def test_mean_and_copy_place_the_right_weights():
    base = tiny_model(4)
    old = [layer_params(layer) for layer in base.model.layers]

    # Lower: gaps after old layers 0 and 1 -> grown order 0, n0, 1, n1, 2, 3.
    mean = tiny_model(4)
    new = grow_layers(mean, 2, "interpolation-mean", "lower", fpi=False, seed=0)
    assert new == [1, 3]
    grown = [layer_params(layer) for layer in mean.model.layers]
    for k in old[0]:
        torch.testing.assert_close(grown[1][k], (old[0][k] + old[1][k]) / 2, rtol=0, atol=0)
        torch.testing.assert_close(grown[3][k], (old[1][k] + old[2][k]) / 2, rtol=0, atol=0)
        for g_idx, o_idx in [(0, 0), (2, 1), (4, 2), (5, 3)]:
            assert torch.equal(grown[g_idx][k], old[o_idx][k])

    # Copy: new layer is a copy of its lower neighbour.
    copy = tiny_model(4)
    grow_layers(copy, 2, "interpolation-copy", "lower", fpi=False, seed=0)
    grown = [layer_params(layer) for layer in copy.model.layers]
    for k in old[0]:
        assert torch.equal(grown[1][k], old[0][k])
        assert torch.equal(grown[3][k], old[1][k])


def test_mean_at_top_copies_top_layer_and_shared_gap_gets_same_init():
    model = tiny_model(2)
    old = [layer_params(layer) for layer in model.model.layers]
    # 5 new into 2 gaps -> gap 0 gets 2, gap 1 (top) gets 3 ("upper" takes the remainder).
    new = grow_layers(model, 5, "interpolation-mean", "upper", fpi=False, seed=0)
    assert new == [1, 2, 4, 5, 6]
    grown = [layer_params(layer) for layer in model.model.layers]
    for k in old[0]:
        avg = (old[0][k] + old[1][k]) / 2
        assert torch.equal(grown[1][k], avg) and torch.equal(grown[2][k], avg)
        for i in (4, 5, 6):
            assert torch.equal(grown[i][k], old[1][k])
    # Same values, but separate storage: training one must not move the other.
    a, b = model.model.layers[4], model.model.layers[5]
    assert a.mlp.up_proj.weight.data_ptr() != b.mlp.up_proj.weight.data_ptr()
    assert a.mlp.up_proj.weight.data_ptr() != model.model.layers[3].mlp.up_proj.weight.data_ptr()


def test_fpi_zeroes_output_projections_only_of_new_layers():
    model = tiny_model(3, attention_bias=True, mlp_bias=True)
    x = ids()
    with torch.no_grad():
        before = model(x).logits
    new = grow_layers(model, 2, "interpolation-mean", "intermediate", fpi=True, seed=0)
    for i, layer in enumerate(model.model.layers):
        zero = i in new
        for proj in (layer.self_attn.o_proj, layer.mlp.down_proj):
            assert bool((proj.weight == 0).all()) == zero
            assert bool((proj.bias == 0).all()) == zero
        assert not bool((layer.self_attn.q_proj.weight == 0).all())
    with torch.no_grad():
        assert torch.equal(before, model(x).logits)


def test_new_layers_trainable_same_dtype_and_mode():
    model = tiny_model(3, dtype=torch.float32).train()
    grow_layers(model, 2, "interpolation-mean", "upper", fpi=False, seed=0)
    for layer in model.model.layers:
        assert layer.training
        for p in layer.parameters():
            assert p.dtype == torch.float32 and p.device.type == "cpu" and p.requires_grad and not p.is_meta


def test_bf16_model_stays_bf16():
    model = tiny_model(3, dtype=torch.bfloat16)
    grow_layers(model, 1, "interpolation-mean", "lower", fpi=False, seed=0)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def incremental_logits(model: LlamaForCausalLM, x: torch.Tensor) -> torch.Tensor:
    """Logits from token-by-token decoding with a KV cache."""
    out, past = [], None
    with torch.no_grad():
        for t in range(x.shape[1]):
            res = model(x[:, t : t + 1], past_key_values=past, use_cache=True)
            past = res.past_key_values
            out.append(res.logits)
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("fpi", [True, False])
def test_kv_cache_decoding_matches_full_forward_after_growth(fpi):
    model = tiny_model(3)
    grow_layers(model, 2, "interpolation-mean", "lower", fpi=fpi, seed=0)
    x = ids(length=6)
    with torch.no_grad():
        full = model(x).logits
    torch.testing.assert_close(incremental_logits(model, x), full, rtol=0, atol=1e-10)
    # And generate() agrees with greedy decoding by repeated full forwards.
    prompt = x[:, :3]
    gen = model.generate(prompt, do_sample=False, max_new_tokens=5, pad_token_id=0)
    seq = prompt
    with torch.no_grad():
        for _ in range(5):
            nxt = model(seq).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
    assert torch.equal(gen, seq)


def test_stale_layer_idx_would_break_the_cache():
    """Guards the reason for renumbering: without it cached decoding is wrong.

    With SDPA (no explicit mask for one-token steps) two layers sharing a cache slot
    raise no error: decoding is silently wrong. (Eager attention happens to fail
    loudly on the mask shape.)
    """
    model = tiny_model(3, attn="sdpa")
    grow_layers(model, 2, "interpolation-mean", "lower", fpi=False, seed=0)
    x = ids(length=6)
    with torch.no_grad():
        full = model(x, use_cache=False).logits
    torch.testing.assert_close(incremental_logits(model, x), full, rtol=0, atol=1e-10)
    # Undo the renumbering the way a naive insertion would leave it.
    stale = [0, 0, 1, 1, 2]
    for layer, idx in zip(model.model.layers, stale, strict=True):
        layer.self_attn.layer_idx = idx
    with torch.no_grad():
        assert torch.equal(model(x, use_cache=False).logits, full)  # a plain forward cannot tell...
    assert not torch.allclose(incremental_logits(model, x), full)  # ...the cache can.


def test_layer_types_rebuilt_when_set():
    model = tiny_model(3)
    model.config.layer_types = ["full_attention", "sliding_attention", "full_attention"]
    grow_layers(model, 2, "interpolation-copy", "intermediate", fpi=True, seed=0)
    # intermediate 2 of 3 -> gaps after old 0 and 1.
    assert model.config.layer_types == [
        "full_attention",
        "full_attention",
        "sliding_attention",
        "sliding_attention",
        "full_attention",
    ]


def test_grow_rejects_bad_arguments():
    model = tiny_model(2)
    with pytest.raises(ValueError):
        grow_layers(model, 1, "interpolation-max", "upper", fpi=False, seed=0)
    with pytest.raises(ValueError):
        grow_layers(model, 1, "interpolation-mean", "top", fpi=False, seed=0)
    assert len(model.model.layers) == 2 and model.config.num_hidden_layers == 2
