"""ReLoRA adapters on the frozen layers of a grown model (STEP Procedure 3).

After growth, STEP freezes the old layers and trains only the new layers plus
low-rank adapters on the old layers' linear maps. Following ReLoRA (Lialin et al.,
2024), the adapters are periodically *merged* into the frozen weight and re-started
(``W += scale * B @ A``; ``A`` re-drawn, ``B`` zeroed), with the adapters' optimizer
state reset, so that a sequence of rank-``r`` updates can add up to a high-rank one.

PEFT provides LoRA layers but not this merge-and-reset cycle (nor merging into
FSDP2-sharded DTensor weights), so the few pieces needed are written here:

* :class:`LoRALinear` and :func:`apply_adapters` -- wrap and freeze;
* :func:`merge_and_reinit` -- the ReLoRA restart, plain tensors or DTensors;
* :func:`reset_optimizer_state` -- zero / magnitude-prune AdamW moments in place;
* :func:`merged_state_dict` -- fold adapters away for a standard Hugging Face export.

Both merges (the restart and the export) add the same fp32 :func:`lora_delta`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from stepc.schema.shapes import LINEAR_MAPS

__all__ = [
    "ADAPTED_PROJECTIONS",
    "LoRALinear",
    "apply_adapters",
    "merge_and_reinit",
    "reset_optimizer_state",
    "lora_delta",
    "merged_state_dict",
]

ADAPTED_PROJECTIONS = LINEAR_MAPS  # every linear map of a decoder layer gets an adapter


def _kaiming_a_(tensor: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Init ``tensor`` (a plain tensor) like ``nn.Linear.weight``: Kaiming-uniform, a=sqrt(5).

    The values are drawn on the generator's device (a CPU generator cannot fill a
    CUDA tensor) and copied over, so the same seeded generator gives the same ``A``
    whatever device the adapter lives on.
    """
    gen_device = generator.device if generator is not None else tensor.device
    drawn = torch.empty(tensor.shape, dtype=tensor.dtype, device=gen_device)
    nn.init.kaiming_uniform_(drawn, a=math.sqrt(5), generator=generator)
    with torch.no_grad():
        tensor.copy_(drawn)
    return tensor


class LoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus a trainable low-rank update.

    ``y = base(x) + scale * (x @ A^T) @ B^T`` with ``A`` (``rank x in``) and ``B``
    (``out x rank``) kept in fp32 (small, and merges/optimizer updates stay accurate
    even when the base weight is bf16), ``scale = alpha / rank``.

    ``B`` starts at zero so wrapping does not change the model's function, and ``A``
    is random: if both were zero, both gradients would be zero too and the adapter
    could never learn.

    The wrapped layer stays reachable as ``self.base`` so state-dict keys are
    ``...q_proj.base.weight``, ``...q_proj.lora_A`` and ``...q_proj.lora_B``.
    """

    def __init__(
        self,
        base: nn.Linear,
        rank: int,
        alpha: float,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"LoRALinear wraps an nn.Linear, got {type(base).__name__}")
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"rank must be an int >= 1, got {rank!r}")
        if rank > min(base.in_features, base.out_features):
            raise ValueError(
                f"rank {rank} exceeds min(in, out) = {min(base.in_features, base.out_features)}"
            )
        self.base = base
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.rank = rank
        self.alpha = float(alpha)
        self.scale = self.alpha / rank
        device = base.weight.device
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, dtype=torch.float32, device=device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, dtype=torch.float32, device=device))
        _kaiming_a_(self.lora_A.data, generator)

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Compute the low-rank path in the activation dtype (bf16 under mixed precision)
        # instead of upcasting activations; the casts are no-ops when FSDP2 already
        # all-gathered the adapters in the compute dtype.
        a = self.lora_A.to(x.dtype)
        b = self.lora_B.to(x.dtype)
        # Frozen weights may be stored in bf16 (Eq. 2's 2 bytes) while activations are fp32 (CPU, or
        # no mixed-precision policy): run the frozen path in the weight's dtype, return x's dtype.
        base = self.base(x.to(self.base.weight.dtype)).to(x.dtype)
        return base + F.linear(F.linear(x, a), b) * self.scale

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha}, scale={self.scale}"


def apply_adapters(
    model: nn.Module,
    layer_indices: list[int],
    rank: int,
    alpha: float,
    generator: torch.Generator | None,
) -> list[LoRALinear]:
    """Freeze decoder layers ``layer_indices`` of a Llama model and add adapters to them.

    Every parameter of those layers (linear weights and norms) gets
    ``requires_grad=False``; the 7 projections (:data:`ADAPTED_PROJECTIONS`) are
    replaced in place by :class:`LoRALinear`, whose ``lora_A``/``lora_B`` are the only
    trainable parameters left in those layers.

    Returns:
        The new adapters, in layer order then :data:`ADAPTED_PROJECTIONS` order (a
        deterministic order, so a seeded ``generator`` gives reproducible ``A``s).
    """
    layers = model.model.layers
    if len(set(layer_indices)) != len(layer_indices):
        raise ValueError(f"duplicate layer indices: {layer_indices}")
    for i in layer_indices:
        if not 0 <= i < len(layers):
            raise ValueError(f"layer index {i} out of range for {len(layers)} layers")
    adapters: list[LoRALinear] = []
    for i in sorted(layer_indices):
        layer = layers[i]
        # Freeze before wrapping: the adapters created below stay trainable.
        for p in layer.parameters():
            p.requires_grad_(False)
        for sub_name, proj_name in ADAPTED_PROJECTIONS:
            parent = getattr(layer, sub_name)
            proj = getattr(parent, proj_name)
            if isinstance(proj, LoRALinear):
                raise ValueError(f"layer {i} {sub_name}.{proj_name} already has an adapter")
            adapter = LoRALinear(proj, rank, alpha, generator)
            setattr(parent, proj_name, adapter)
            adapters.append(adapter)
    return adapters


def _full(t: torch.Tensor) -> torch.Tensor:
    """The whole (unsharded) value of ``t``; all-gathers a DTensor."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def _like(
    full: torch.Tensor, param: torch.Tensor, src_data_rank: int | None, cast: bool = True
) -> torch.Tensor:
    """``full`` laid out like ``param``: itself for a plain tensor, or a DTensor
    with ``param``'s mesh and placements (each rank keeping only its shard).

    ``src_data_rank=None`` slices locally (valid because every rank holds the same
    ``full``); ``0`` scatters rank 0's copy, which guarantees identical shards even if
    ranks' values could differ. ``cast=False`` keeps ``full``'s dtype.
    """
    full = full.to(device=param.device, dtype=param.dtype if cast else full.dtype)
    if isinstance(param, DTensor):
        return distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=src_data_rank)
    return full


def lora_delta(lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float) -> torch.Tensor:
    """The function an adapter adds to its base weight, in fp32: ``scale * B @ A``."""
    return (lora_b.float() @ lora_a.float()) * scale


def merge_and_reinit(adapters: list[LoRALinear], generator: torch.Generator | None) -> None:
    """ReLoRA restart: fold each adapter into its frozen weight, then re-start it.

    ``W += scale * B @ A`` (exactly the function the adapter added, so the model's
    outputs are unchanged up to rounding), then ``A`` is re-drawn Kaiming-uniform and
    ``B`` zeroed (so the restarted adapter again adds nothing). The adapters'
    optimizer state is *not* touched here: see :func:`reset_optimizer_state`.

    Works on plain tensors and on FSDP2 (``fully_shard``) DTensor parameters. For
    DTensors the delta is built from the all-gathered ``A``/``B`` (identical on all
    ranks), and each rank adds its own shard of it. ``A`` is drawn in full on every
    rank from ``generator`` (so pass the same seeded generator on every rank: its
    state then advances identically) and rank 0's draw is scattered, so all ranks
    hold shards of one and the same ``A``.

    Under FSDP2, call it while parameters are *sharded* (after ``backward``/``step``):
    a forward without backward leaves the root module's parameters unsharded, and
    writes to those temporary unsharded copies would be lost at the next reshard
    (call ``model.reshard()`` first in that case).
    """
    with torch.no_grad():
        for ad in adapters:
            w = ad.base.weight
            delta = lora_delta(_full(ad.lora_A), _full(ad.lora_B), ad.scale)
            # Keep the delta in fp32: the in-place add then rounds once into a bf16 W.
            w.add_(_like(delta, w, src_data_rank=None, cast=False))

            # Re-init A as a full tensor (so the values do not depend on sharding).
            a_new = torch.empty(tuple(ad.lora_A.shape), dtype=torch.float32)
            _kaiming_a_(a_new, generator)
            ad.lora_A.copy_(_like(a_new, ad.lora_A, src_data_rank=0))
            ad.lora_B.zero_()


def _prune_by_magnitude_(t: torch.Tensor, prune_ratio: float) -> None:
    """Zero, in place, all but the ``round((1 - prune_ratio) * numel)`` largest-|x| entries."""
    if isinstance(t, DTensor):
        # Operate per shard: a global top-k would need an all-gather of the moments;
        # with shards of ~equal size the kept fraction is the same, only the cut-off
        # value differs slightly between ranks.
        t = t.to_local()
    n = t.numel()
    keep = int(round((1.0 - prune_ratio) * n))
    if keep >= n:
        return
    if keep <= 0:
        t.zero_()
        return
    flat = t.reshape(-1)
    # topk (not a threshold) so ties cannot make us keep more than `keep` entries.
    idx = torch.topk(flat.abs(), keep, sorted=False).indices
    mask = torch.zeros(n, dtype=torch.bool, device=t.device)
    mask[idx] = True
    t.masked_fill_(~mask.view(t.shape), 0)


#: AdamW moment buffers. ``step`` is deliberately left alone (ReLoRA keeps counting).
_MOMENT_KEYS: tuple[str, ...] = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")


def reset_optimizer_state(
    optimizer: torch.optim.Optimizer,
    params: list[nn.Parameter],
    mode: str,
    prune_ratio: float,
) -> None:
    """Reset the AdamW moments of ``params`` after a merge, in place.

    Args:
        optimizer: the optimizer holding ``params``.
        params: the parameters whose state to reset (the adapters' ``lora_A``/``lora_B``).
        mode: ``"zero"`` zeroes ``exp_avg``/``exp_avg_sq`` (and ``max_exp_avg_sq`` for
            amsgrad); ``"magnitude"`` keeps the largest ``1 - prune_ratio`` fraction of
            each of those tensors by magnitude and zeroes the rest (ReLoRA's pruning).
        prune_ratio: fraction to zero in ``"magnitude"`` mode, in ``[0, 1]``.

    Tensors are modified in place and state entries are never removed: checkpoint
    loading (torch.distributed.checkpoint) and the optimizer's step both expect the
    keys to be there. Parameters with no state yet are skipped.
    """
    if mode not in ("zero", "magnitude"):
        raise ValueError(f"unknown mode {mode!r}; expected 'zero' or 'magnitude'")
    if not 0.0 <= prune_ratio <= 1.0:
        raise ValueError(f"prune_ratio must be in [0, 1], got {prune_ratio!r}")
    with torch.no_grad():
        for p in params:
            state = optimizer.state.get(p)
            if not state:
                continue
            for key in _MOMENT_KEYS:
                t = state.get(key)
                if not isinstance(t, torch.Tensor):
                    continue
                if mode == "zero":
                    t.zero_()
                else:
                    _prune_by_magnitude_(t, prune_ratio)


def merged_state_dict(state: dict[str, torch.Tensor], scale: float) -> dict[str, torch.Tensor]:
    """A full (unsharded) state dict with every adapter folded into its weight, in fp32, with plain
    Hugging Face keys: `...proj.base.weight` + `lora_delta` becomes `...proj.weight`."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.endswith((".lora_A", ".lora_B")):
            continue
        if key.endswith(".base.weight"):
            prefix = key[: -len(".base.weight")]
            out[prefix + ".weight"] = value.float() + lora_delta(state[prefix + ".lora_A"], state[prefix + ".lora_B"], scale)
        elif ".base." in key:
            out[key.replace(".base.", ".")] = value.float()
        else:
            out[key] = value.float()
    return out
