"""A CUDA out-of-memory error in a training step, turned into one message a researcher can act on.

The step's tensors are freed with the exception; the last complete checkpoint was written before
the step started, so a rerun of the stage script (after changing the spec and recompiling) resumes
from it.
"""

from __future__ import annotations

import torch

from stepc.runtime.guard import RuntimeFailure
from stepc.schema.plan import Plan, StagePlan
from stepc.schema.spec import Spec
from stepc.schema.units import format_bytes


def oom_failure(spec: Spec, plan: Plan, stage: StagePlan, device: torch.device, step: int,
                kept: str) -> RuntimeFailure:
    capacity = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None
    has = f"the GPU has {format_bytes(capacity)}" if capacity else "the device's capacity is unknown"
    tr = spec.train
    fixes = [f"lower train.micro_batch_size (now {tr.micro_batch_size}; gradient accumulation keeps the global batch)"]
    if not tr.activation_checkpointing:
        fixes.append("set train.activation_checkpointing = true")
    if not tr.compile:
        fixes.append("set train.compile = true (fused kernels keep fewer intermediates)")
    if plan.accounting != "device":
        fixes.append('set memory.accounting = "device" so the plan predicts activations too')
    return RuntimeFailure(
        f"CUDA out of memory at stage {stage.index} step {step}: the plan predicted a peak of "
        f"{format_bytes(stage.peak_bytes)} per GPU (memory.accounting = \"{plan.accounting}\"), {has}. "
        f"To fit: {'; '.join(fixes)}; then recompile and rerun the stage script. {kept}")
