"""Tests for stepc.runtime.model.lora (ReLoRA adapters on frozen layers)."""

from __future__ import annotations

import math
import socket

import pytest
import torch
import torch.distributed as dist
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from stepc.runtime.model.lora import (
    ADAPTED_PROJECTIONS,
    LoRALinear,
    apply_adapters,
    merge_and_reinit,
    merged_state_dict,
    reset_optimizer_state,
)


def tiny_config(num_layers: int = 3) -> LlamaConfig:
    return LlamaConfig(
        hidden_size=32,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        vocab_size=97,
        num_hidden_layers=num_layers,
        max_position_embeddings=64,
        attn_implementation="eager",
    )


def tiny_model(num_layers: int = 3, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_config(num_layers)).eval()


def ids(batch: int = 2, length: int = 8, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 97, (batch, length), generator=g)


def train_steps(model: nn.Module, params: list[nn.Parameter], steps: int = 3, lr: float = 0.5) -> None:
    """A few manual SGD steps on a LM loss (no optimizer object)."""
    x = ids(seed=11)
    for _ in range(steps):
        loss = model(x, labels=x).loss
        grads = torch.autograd.grad(loss, params)
        with torch.no_grad():
            for p, g in zip(params, grads, strict=True):
                p.sub_(lr * g)


def adapter_params(adapters: list[LoRALinear]) -> list[nn.Parameter]:
    return [p for ad in adapters for p in (ad.lora_A, ad.lora_B)]


# --------------------------------------------------------------------------- LoRALinear


def test_lora_linear_init_and_forward():
    torch.manual_seed(0)
    base = nn.Linear(16, 12)
    ad = LoRALinear(base, rank=4, alpha=8.0, generator=torch.Generator().manual_seed(3))
    assert ad.base is base and ad.scale == 2.0
    assert ad.lora_A.shape == (4, 16) and ad.lora_B.shape == (12, 4)
    assert ad.lora_A.dtype == ad.lora_B.dtype == torch.float32
    assert not base.weight.requires_grad and not base.bias.requires_grad
    assert ad.lora_A.requires_grad and ad.lora_B.requires_grad
    assert torch.count_nonzero(ad.lora_A) == ad.lora_A.numel()  # A random
    assert torch.count_nonzero(ad.lora_B) == 0  # B zero -> function unchanged
    bound = 1 / math.sqrt(16)  # nn.Linear's Kaiming-uniform(a=sqrt(5)) bound
    assert ad.lora_A.abs().max() <= bound
    # Reproducible from the generator.
    again = LoRALinear(nn.Linear(16, 12), 4, 8.0, generator=torch.Generator().manual_seed(3))
    assert torch.equal(again.lora_A, ad.lora_A)
    x = torch.randn(5, 16)
    assert torch.equal(ad(x), base(x))
    with torch.no_grad():
        ad.lora_B.normal_()
    expected = base(x) + 2.0 * (x @ ad.lora_A.T) @ ad.lora_B.T
    torch.testing.assert_close(ad(x), expected)
    assert set(ad.state_dict()) == {"base.weight", "base.bias", "lora_A", "lora_B"}


def test_lora_linear_computes_in_input_dtype():
    base = nn.Linear(8, 8).to(torch.bfloat16)
    ad = LoRALinear(base, 2, 2.0)
    assert ad(torch.randn(3, 8, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_lora_linear_rejects_bad_rank():
    with pytest.raises(ValueError):
        LoRALinear(nn.Linear(8, 8), 0, 1.0)
    with pytest.raises(ValueError):
        LoRALinear(nn.Linear(8, 4), 5, 1.0)


# --------------------------------------------------------------------------- apply_adapters


def test_apply_adapters_wraps_and_freezes_only_given_layers():
    model = tiny_model(3)
    x = ids()
    with torch.no_grad():
        before = model(x).logits
    adapters = apply_adapters(model, [0, 2], rank=4, alpha=8.0, generator=torch.Generator().manual_seed(0))
    assert len(adapters) == 2 * 7
    with torch.no_grad():
        assert torch.equal(model(x).logits, before)  # B = 0: same function
    for i, layer in enumerate(model.model.layers):
        for sub, proj in ADAPTED_PROJECTIONS:
            assert isinstance(getattr(getattr(layer, sub), proj), LoRALinear) == (i in (0, 2))
        trainable = {n for n, p in layer.named_parameters() if p.requires_grad}
        if i == 1:
            assert trainable == {n for n, _ in layer.named_parameters()}
        else:
            assert trainable and all(n.endswith(("lora_A", "lora_B")) for n in trainable)
            assert not layer.input_layernorm.weight.requires_grad
            assert not layer.post_attention_layernorm.weight.requires_grad
    keys = set(model.state_dict())
    assert "model.layers.0.self_attn.q_proj.base.weight" in keys
    assert "model.layers.0.mlp.down_proj.lora_B" in keys
    assert "model.layers.1.self_attn.q_proj.weight" in keys
    with pytest.raises(ValueError):
        apply_adapters(model, [0], 4, 8.0, None)  # already wrapped
    with pytest.raises(ValueError):
        apply_adapters(model, [3], 4, 8.0, None)  # out of range


# --------------------------------------------------------------------------- merge_and_reinit


def test_merge_preserves_logits_and_restarts_adapters():
    torch.manual_seed(0)
    model = tiny_model(3)
    adapters = apply_adapters(model, [0, 1, 2], rank=4, alpha=8.0, generator=torch.Generator().manual_seed(0))
    train_steps(model, adapter_params(adapters))
    assert all(torch.count_nonzero(ad.lora_B) > 0 for ad in adapters)
    old_A = [ad.lora_A.detach().clone() for ad in adapters]
    old_W = [ad.base.weight.detach().clone() for ad in adapters]
    x = ids()
    with torch.no_grad():
        before = model(x).logits

    merge_and_reinit(adapters, torch.Generator().manual_seed(1))

    with torch.no_grad():
        after = model(x).logits
    torch.testing.assert_close(after, before, rtol=0, atol=1e-5)
    for ad, a0, w0 in zip(adapters, old_A, old_W, strict=True):
        assert torch.count_nonzero(ad.lora_B) == 0
        assert torch.count_nonzero(ad.lora_A) == ad.lora_A.numel()
        assert not torch.equal(ad.lora_A, a0)  # re-drawn
        assert not torch.equal(ad.base.weight, w0)  # delta merged
        assert ad.lora_A.requires_grad and not ad.base.weight.requires_grad


def test_merge_writes_exact_delta_into_weight():
    torch.manual_seed(0)
    ad = LoRALinear(nn.Linear(6, 5, bias=False), 2, alpha=3.0)
    with torch.no_grad():
        ad.lora_B.normal_()
    expected = ad.base.weight + 1.5 * ad.lora_B @ ad.lora_A
    param_ids = (id(ad.base.weight), id(ad.lora_A), id(ad.lora_B))
    merge_and_reinit([ad], None)
    torch.testing.assert_close(ad.base.weight.detach(), expected.detach(), rtol=0, atol=1e-6)
    # In place: the optimizer's references to the parameters stay valid.
    assert param_ids == (id(ad.base.weight), id(ad.lora_A), id(ad.lora_B))


def test_frozen_base_unchanged_by_optimizer_between_merges():
    model = tiny_model(3)
    adapters = apply_adapters(model, [0, 1], rank=4, alpha=8.0, generator=torch.Generator().manual_seed(0))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen  # there is something to check
    # Weight decay on everything would move frozen params if they were in the optimizer
    # or received gradients.
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    x = ids()
    for _ in range(3):
        opt.zero_grad()
        model(x, labels=x).loss.backward()
        opt.step()
    for n, p in model.named_parameters():
        if n in frozen:
            assert p.grad is None, n
            assert torch.equal(p, frozen[n]), n
    assert any(torch.count_nonzero(ad.lora_B) > 0 for ad in adapters)


# --------------------------------------------------------------------------- optimizer state


def _adamw_with_state() -> tuple[torch.optim.AdamW, list[nn.Parameter], nn.Parameter]:
    torch.manual_seed(0)
    params = [nn.Parameter(torch.randn(10, 10)), nn.Parameter(torch.randn(7))]
    other = nn.Parameter(torch.randn(4))
    opt = torch.optim.AdamW(params + [other], lr=1e-3)
    loss = sum((p**3).sum() for p in params) + (other**3).sum()
    loss.backward()
    opt.step()
    return opt, params, other


def test_reset_zero_is_in_place_and_keeps_keys():
    opt, params, other = _adamw_with_state()
    before_keys = {id(p): set(opt.state[p]) for p in params}
    tensors = {id(p): {k: opt.state[p][k] for k in ("exp_avg", "exp_avg_sq")} for p in params}
    steps = {id(p): opt.state[p]["step"].clone() for p in params}
    other_avg = opt.state[other]["exp_avg"].clone()
    reset_optimizer_state(opt, params, "zero", 0.0)
    for p in params:
        assert set(opt.state[p]) == before_keys[id(p)]
        for k in ("exp_avg", "exp_avg_sq"):
            assert opt.state[p][k] is tensors[id(p)][k]  # same tensor object
            assert torch.count_nonzero(opt.state[p][k]) == 0
        assert torch.equal(opt.state[p]["step"], steps[id(p)])
    assert torch.equal(opt.state[other]["exp_avg"], other_avg)  # untouched
    # The optimizer still steps (and the state dict round-trips) after a reset.
    opt.step()
    opt.load_state_dict(opt.state_dict())


@pytest.mark.parametrize("prune_ratio", [0.0, 0.5, 0.9, 0.999, 1.0])
def test_reset_magnitude_keeps_largest_fraction(prune_ratio):
    opt, params, _ = _adamw_with_state()
    originals = {id(p): {k: opt.state[p][k].clone() for k in ("exp_avg", "exp_avg_sq")} for p in params}
    tensors = {id(p): opt.state[p]["exp_avg"] for p in params}
    reset_optimizer_state(opt, params, "magnitude", prune_ratio)
    for p in params:
        assert opt.state[p]["exp_avg"] is tensors[id(p)]
        for k in ("exp_avg", "exp_avg_sq"):
            orig, now = originals[id(p)][k], opt.state[p][k]
            n = orig.numel()
            keep = round((1 - prune_ratio) * n)
            assert torch.count_nonzero(now) == keep
            kept = now != 0
            # Kept entries are unchanged and are the largest by magnitude.
            assert torch.equal(now[kept], orig[kept])
            if 0 < keep < n:
                assert orig[kept].abs().min() >= orig[~kept].abs().max()


def test_reset_rejects_bad_arguments_and_skips_params_without_state():
    opt, params, _ = _adamw_with_state()
    with pytest.raises(ValueError):
        reset_optimizer_state(opt, params, "random", 0.5)
    with pytest.raises(ValueError):
        reset_optimizer_state(opt, params, "magnitude", 1.5)
    fresh = nn.Parameter(torch.randn(3))
    reset_optimizer_state(opt, [fresh], "zero", 0.0)  # no state yet: nothing to do
    assert fresh not in opt.state


# --------------------------------------------------------------------------- export


def test_export_merge_gives_plain_llama_state_dict_and_same_logits():
    """The export's merge (merged_state_dict, what write_export saves): plain HF keys, same function."""
    model = tiny_model(3)
    adapters = apply_adapters(model, [0, 2], rank=4, alpha=8.0, generator=torch.Generator().manual_seed(0))
    train_steps(model, adapter_params(adapters))
    assert any(a.lora_B.abs().sum() > 0 for a in adapters)  # trained adapters: the merge has something to fold
    x = ids()
    with torch.no_grad():
        before = model(x).logits
    merged = merged_state_dict(model.state_dict(), adapters[0].scale)
    plain = LlamaForCausalLM(tiny_config(3))
    assert set(merged) == set(plain.state_dict())
    plain.load_state_dict(merged)
    plain.eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(x).logits, before, rtol=0, atol=1e-5)


# --------------------------------------------------------------------------- DTensor / FSDP2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def gloo_group():
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("gloo", rank=0, world_size=1, init_method=f"tcp://127.0.0.1:{_free_port()}")
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_merge_and_reset_on_fsdp2_dtensors(gloo_group):
    """1-process FSDP2: exercises the DTensor code paths (not cross-rank sharding)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    mesh = init_device_mesh("cpu", (1,))
    model = tiny_model(2)
    adapters = apply_adapters(model, [0], rank=4, alpha=8.0, generator=torch.Generator().manual_seed(0))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    params = adapter_params(adapters)
    assert all(isinstance(p, DTensor) for p in params)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x = ids()
    for _ in range(2):
        opt.zero_grad()
        model(x, labels=x).loss.backward()
        opt.step()
    assert isinstance(adapters[0].base.weight, DTensor)  # resharded after backward
    assert any(torch.count_nonzero(ad.lora_B.full_tensor()) > 0 for ad in adapters)
    w_old = [ad.base.weight.full_tensor().clone() for ad in adapters]
    deltas = [ad.scale * ad.lora_B.full_tensor() @ ad.lora_A.full_tensor() for ad in adapters]
    with torch.no_grad():
        before = model(x).logits
    model.reshard()  # a forward without backward leaves the root unsharded

    merge_and_reinit(adapters, torch.Generator().manual_seed(5))
    reset_optimizer_state(opt, params, "zero", 0.0)

    expected_A = []
    g = torch.Generator().manual_seed(5)
    for ad in adapters:
        a = torch.empty(ad.lora_A.shape)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=g)
        expected_A.append(a)
    for ad, w0, d, a in zip(adapters, w_old, deltas, expected_A, strict=True):
        assert isinstance(ad.lora_A, DTensor) and isinstance(ad.base.weight, DTensor)
        torch.testing.assert_close(ad.base.weight.full_tensor(), w0 + d, rtol=0, atol=1e-6)
        assert torch.count_nonzero(ad.lora_B.full_tensor()) == 0
        assert torch.equal(ad.lora_A.full_tensor(), a)
    for p in params:
        assert torch.count_nonzero(opt.state[p]["exp_avg"].full_tensor()) == 0
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, before, rtol=0, atol=1e-5)
