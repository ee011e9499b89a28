"""Which dtype the model computes in, in one place for training, the runtime's evaluations and `stepc eval`.

precision = "bf16" on a GPU: FSDP2's mixed-precision policy runs sharded models with bf16 parameters
(fp32 masters). A model that is not sharded (GaLore, which is not FSDP-aware) gets the same compute
dtype from autocast instead of silently running in fp32. `stepc eval` loads the export in bf16 so its
perplexities are the runtime's. On CPU everything computes in fp32 (the frozen bf16 weights aside).
"""

from __future__ import annotations

import contextlib

import torch


def compute_dtype(precision: str, device: torch.device | str) -> torch.dtype:
    return torch.bfloat16 if precision == "bf16" and torch.device(device).type == "cuda" else torch.float32


def autocast_unsharded(precision: str, device: torch.device, sharded: bool):
    """autocast to the compute dtype for a model FSDP2 does not cast; a no-op otherwise."""
    dtype = compute_dtype(precision, device)
    if sharded or dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)
