"""memory.accounting = "device" against the tensors a training forward really keeps for backward.

The runtime's model (StepcLlama, SDPA attention) runs decoder layers in the compute dtype, as
FSDP2's bf16 mixed precision runs them on a GPU; torch.autograd.graph.saved_tensors_hooks sees
every tensor autograd saves, and their distinct storages (parameters excluded) are the layer's
activation memory. The compiler's per-layer formula must be within 5% of that count for MHA and
GQA, bf16 and fp32, with and without activation checkpointing, and for a frozen layer with adapters.
"""

from __future__ import annotations

import pytest
import torch

from stepc.compiler.load import parse_spec
from stepc.compiler.memory import device_costs
from stepc.runtime.model.llama import wrap_decoder_layers

SPEC = """
[experiment]
name = "mem"
[model]
hidden_size = {d}
num_layers = 4
num_attention_heads = 8
num_key_value_heads = {kv}
vocab_size = 512
seq_len = 128
[memory]
accounting = "device"
[step]
lora_rank = 8
[train]
global_batch_tokens = 256
micro_batch_size = 2
precision = "{precision}"
activation_checkpointing = {ckpt}
[launch]
nproc_per_node = 1
[data]
tokenizer = "bpe-512"
"""


def _spec(**values):
    from stepc.compiler.checks import normalize

    return normalize(parse_spec(SPEC.format(**values)), "<spec>")  # fills intermediate_size


def _saved_bytes_per_token(spec, layers: int, frozen: int) -> float:
    """Bytes of distinct non-parameter storages autograd saves in `layers` decoder layers, per token."""
    from stepc.runtime.model.lora import apply_adapters
    from stepc.runtime.model.llama import StepcLlama, runtime_config

    torch.manual_seed(0)
    model = StepcLlama(runtime_config(spec.model, layers))
    if frozen:
        apply_adapters(model, list(range(frozen)), spec.step.lora_rank, spec.step.lora_alpha, torch.Generator().manual_seed(0))
    model = model.to(torch.bfloat16 if spec.train.precision == "bf16" else torch.float32)
    if spec.train.activation_checkpointing:
        wrap_decoder_layers(model, compile_=False, checkpointing=True)  # as the runtime does
    model.train()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    b, s = spec.train.micro_batch_size, spec.model.seq_len
    x = torch.randint(0, spec.model.vocab_size, (b, s))
    hidden = model.model.embed_tokens(x).detach().requires_grad_(True)
    position_ids = torch.arange(s)[None]
    rope = model.model.rotary_emb(hidden, position_ids=position_ids)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        for layer in model.model.layers:
            hidden = layer(hidden, attention_mask=None, position_embeddings=rope, position_ids=position_ids)
    return sum(saved.values()) / (b * s)


@pytest.mark.parametrize("kv", [8, 2], ids=["mha", "gqa"])
@pytest.mark.parametrize("ckpt", ["false", "true"])
@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_layer_activation_bytes_match_saved_tensors(kv, ckpt, precision):
    spec = _spec(d=256, kv=kv, precision=precision, ckpt=ckpt)
    tokens = spec.train.micro_batch_size * spec.model.seq_len
    predicted = device_costs(spec).activation_layer_bytes / tokens
    measured = _saved_bytes_per_token(spec, layers=2, frozen=0) / 2
    assert predicted == pytest.approx(measured, rel=0.05), (predicted, measured)


def test_frozen_layer_with_adapters_keeps_its_activations_and_the_adapters():
    spec = _spec(d=256, kv=2, precision="bf16", ckpt="false")
    costs = device_costs(spec)
    tokens = spec.train.micro_batch_size * spec.model.seq_len
    predicted = (2 * costs.activation_layer_bytes + costs.activation_adapter_bytes) / tokens
    measured = _saved_bytes_per_token(spec, layers=2, frozen=1)
    assert predicted == pytest.approx(measured, rel=0.05), (predicted, measured)
