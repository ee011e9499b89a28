"""Model FLOPs per token of a training step, and the GPUs' peak FLOP/s, for MFU.

Per token of one forward + backward pass, with d = hidden size, s = sequence length, V = vocabulary,
P = weights of one decoder layer's seven linear maps, E = its adapters' weights (r (in + out) per map):

    6 (new P + old E + V d)      trained matmul weights: 2 forward + 4 backward (input and weight grads)
  + 4 old P                      frozen layers: 2 forward + 2 backward (input grads only: the layers
                                 below and the embeddings are trained, so the gradient passes through)
  + 12 (new + old) d s           attention scores and values: 2 matmuls x 2 d s forward, x3 with backward

The LM head (V d) counts as a trained matmul whether or not it is tied to the embeddings; the
embedding lookup, norms, activations and softmax are not matmuls and are left out; attention counts
the full s x s (PaLM's convention; a causal kernel skips half of it, so MFU can read slightly low);
activation-checkpointing recomputation is not counted (that would be hardware FLOPs utilisation).
MFU = tokens/s x FLOPs/token / (peak FLOP/s x GPUs).

Peaks are dense (no sparsity) BF16 tensor-core FLOP/s from NVIDIA's datasheets, keyed by the exact
name torch.cuda.get_device_name reports; a name not in the table gets no MFU rather than a guess
(an "H100 PCIe" is not an SXM H100, an "L40" is not an "L4").
"""

from __future__ import annotations

import torch

from stepc.schema.spec import Model

GPU_PEAK_BF16: dict[str, float] = {
    "NVIDIA H100 80GB HBM3": 989.4e12,  # H100 SXM5
    "NVIDIA H100 PCIe": 756.0e12,
    "NVIDIA H100 NVL": 835.5e12,
    "NVIDIA H200": 989.4e12,  # H200 SXM
    "NVIDIA H200 NVL": 835.5e12,
    "NVIDIA GH200 480GB": 989.4e12,
    "NVIDIA A100-SXM4-80GB": 312e12,
    "NVIDIA A100-SXM4-40GB": 312e12,
    "NVIDIA A100 80GB PCIe": 312e12,
    "NVIDIA A100-PCIE-40GB": 312e12,
    "NVIDIA L40S": 362.05e12,
    "NVIDIA L40": 181.05e12,
    "NVIDIA L4": 121.0e12,
    "NVIDIA A10": 125.0e12,
}


def peak_flops(device_name: str | None) -> float | None:
    """Dense BF16 peak of the exactly named GPU, None when unknown (or not a GPU)."""
    return GPU_PEAK_BF16.get(device_name) if device_name else None


def device_peak_flops(device: torch.device) -> float | None:
    return peak_flops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None


def layer_matmul_params(model: Model) -> int:
    """P: weights of one decoder layer's linear maps (q, k, v, o, gate, up, down)."""
    d, inter, kv = model.hidden_size, model.intermediate_size, model.kv_dim
    return d * d * 2 + 2 * d * kv + 3 * d * inter


def adapter_params(model: Model, rank: int) -> int:
    """E: adapter weights on one frozen layer, r (in + out) for each of the seven maps."""
    d, inter, kv = model.hidden_size, model.intermediate_size, model.kv_dim
    return rank * ((d + d) * 2 + (d + kv) * 2 + (d + inter) * 3)


def flops_per_token(model: Model, new: int, old: int, lora_rank: int) -> float:
    """Training FLOPs per token of a stage with `new` trained and `old` frozen (adapted) layers."""
    d, s, v = model.hidden_size, model.seq_len, model.embedding_rows
    p = layer_matmul_params(model)
    e = adapter_params(model, lora_rank) if old else 0
    return 6 * (new * p + old * e + v * d) + 4 * old * p + 12 * (new + old) * d * s


def mfu(tokens_per_s: float, per_token: float, peak: float | None, world: int) -> float | None:
    return None if not peak else tokens_per_s * per_token / (peak * world)
