"""The model's shapes and the arithmetic on them, torch-free: the one home of parameter and FLOP
counts that the compiler (memory model, FLOPs budget) and the runtime (MFU, loss chunks) share.

Two kinds of FLOPs, named apart:

* budget FLOPs (`budget_flops_per_token`): the paper's Appendix E accounting of a stage, 6 per
  trained and f per frozen non-embedding parameter; it splits the vanilla run's compute over the
  stages (stepc.compiler.schedule).
* model FLOPs (`model_flops_per_token`): the matmuls a training step really runs, the LM head and
  attention included, for MFU:

      6 (new P + old E + V d)      trained matmul weights: 2 forward + 4 backward (input and weight grads)
    + 4 old P                      frozen layers: 2 forward + 2 backward (input grads only: the layers
                                   below and the embeddings are trained, so the gradient passes through)
    + 12 (new + old) d s           attention scores and values: 2 matmuls x 2 d s forward, x3 with backward

  with P the weights of one decoder layer's seven linear maps, E its adapters' (r (in + out) per
  map), V the embedding rows (padded: vocab_multiple_of). The LM head counts as a trained matmul
  whether or not it is tied; the embedding lookup, norms, activations and softmax are not matmuls;
  attention counts the full s x s (PaLM's convention; a causal kernel skips half of it, so MFU can
  read slightly low); activation-checkpointing recomputation is not counted.
"""

from __future__ import annotations

from stepc.schema.spec import Model

LINEAR_MAPS: tuple[tuple[str, str], ...] = (
    ("self_attn", "q_proj"), ("self_attn", "k_proj"), ("self_attn", "v_proj"), ("self_attn", "o_proj"),
    ("mlp", "gate_proj"), ("mlp", "up_proj"), ("mlp", "down_proj"),
)
"""The seven linear maps of a LLaMA decoder layer, as (submodule, attribute): what the memory model
counts and what gets ReLoRA adapters."""

LOSS_CHUNK_TOKENS = 2048
"""Tokens whose logits exist at a time in the chunked LM-head loss (stepc.runtime.loop.loss), which the
device accounting counts: x 50257 x 4 bytes = 0.4 GB of fp32 logits, enough rows to keep a GPU busy."""

IGNORE_INDEX = -100
"""Label of a token the loss skips (transformers' convention): instruction tuning's prompt and padding
tokens (stepc.runtime.data.instructions), which stepc.runtime.loop.loss leaves out of the mean."""

FROZEN_FLOPS = {"paper": 2, "backprop": 4}
"""Budget FLOPs per token of a frozen parameter (train.flops_accounting): the paper's 2 (Appendix E),
or 4 when counting the backward pass through the frozen layer that adapters need."""


def linear_shapes(model: Model) -> dict[str, tuple[int, int]]:
    """(in, out) of each linear map of a decoder layer, by attribute name (LLaMA has no biases)."""
    d, inter, kv = model.hidden_size, model.intermediate_size, model.kv_dim
    return {"q_proj": (d, d), "k_proj": (d, kv), "v_proj": (d, kv), "o_proj": (d, d),
            "gate_proj": (d, inter), "up_proj": (d, inter), "down_proj": (inter, d)}


def layer_matmul_params(model: Model) -> int:
    """P: weights of one decoder layer's linear maps."""
    return sum(i * o for i, o in linear_shapes(model).values())


def layer_params(model: Model) -> int:
    """Parameters of one decoder layer: its linear maps and two RMSNorm weights."""
    return layer_matmul_params(model) + 2 * model.hidden_size


def adapter_params(model: Model, rank: int) -> int:
    """E: adapter weights on one frozen layer, r (in + out) for each of the seven maps."""
    return sum(rank * (i + o) for i, o in linear_shapes(model).values())


def fixed_params(model: Model) -> int:
    """Parameters outside the decoder layers: the embedding, the head unless tied, the final norm."""
    return model.embedding_rows * model.hidden_size * (1 if model.tie_embeddings else 2) + model.hidden_size


def budget_flops_per_token(trainable: int, frozen: int, accounting: str) -> int:
    """Appendix E: 6 per trained and FROZEN_FLOPS[accounting] per frozen (non-embedding) parameter."""
    return 6 * trainable + FROZEN_FLOPS[accounting] * frozen


def model_flops_per_token(model: Model, new: int, old: int, lora_rank: int) -> float:
    """Training matmul FLOPs per token of a stage with `new` trained and `old` frozen, adapted layers."""
    d, s, v = model.hidden_size, model.seq_len, model.embedding_rows
    p = layer_matmul_params(model)
    e = adapter_params(model, lora_rank) if old else 0
    return 6 * (new * p + old * e + v * d) + 4 * old * p + 12 * (new + old) * d * s
