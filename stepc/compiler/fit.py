"""Will it fit: `stepc plan SPEC --gpu h100-80gb` (or `--gpu-memory 80GB`) before anything is queued.

For every stage of the plan's layout, the per-GPU peak comes from the compiler's `device`
accounting (stepc.memory.costs_for on the spec with accounting = "device"; this module never
restates that formula, so corrections to it reach this answer unchanged). It then searches the
micro batch sizes the global batch allows (global_batch_tokens a multiple of seq_len x micro
batch x ranks) for the largest that fits, without and with activation checkpointing.

The answer is only as good as the estimate: its error bound is what bench/gpu.py last measured
against torch.cuda.max_memory_allocated, recorded in MEASURED_ERROR below (None until then).
"""

from __future__ import annotations

from dataclasses import dataclass

from stepc.errors import UserError
from stepc.schema.plan import Plan
from stepc.schema.spec import Spec
from stepc.schema.units import format_bytes, parse_bytes

# Memory one process can allocate, as CUDA reports it (torch.cuda.get_device_properties().total_memory,
# rounded down to 0.1 GiB): a little under the marketed size. CUDA context and NCCL buffers are extra.
GiB = 2**30
GPUS: dict[str, tuple[str, int]] = {
    "h200-141gb": ("NVIDIA H200 141GB", int(139.8 * GiB)),
    "h100-80gb": ("NVIDIA H100 80GB", int(79.1 * GiB)),
    "a100-80gb": ("NVIDIA A100 80GB", int(79.1 * GiB)),
    "a100-40gb": ("NVIDIA A100 40GB", int(39.4 * GiB)),
    "l40s-48gb": ("NVIDIA L40S 48GB", int(44.4 * GiB)),
    "a6000-48gb": ("NVIDIA RTX A6000 48GB", int(47.4 * GiB)),
    "v100-32gb": ("NVIDIA V100 32GB", int(31.7 * GiB)),
    "rtx4090-24gb": ("NVIDIA GeForce RTX 4090 24GB", int(23.6 * GiB)),
    "rtx3090-24gb": ("NVIDIA GeForce RTX 3090 24GB", int(23.6 * GiB)),
    "l4-24gb": ("NVIDIA L4 24GB", int(22.0 * GiB)),
    "a10-24gb": ("NVIDIA A10 24GB", int(22.0 * GiB)),
    "mi300x-192gb": ("AMD Instinct MI300X 192GB", int(191.9 * GiB)),
}

# (GPU, worst relative error of the device estimate vs measured peak, what was measured), written from
# bench/gpu.py's last run. None: the estimate has not been checked against a GPU yet.
MEASURED_ERROR: tuple[str, float, str] | None = None


@dataclass(frozen=True)
class StageFit:
    index: int
    layers: int
    peak_bytes: int  # per GPU, at the spec's micro batch and activation checkpointing
    fits: bool
    max_micro_batch: int | None  # largest allowed micro batch that fits without activation checkpointing
    max_micro_batch_ac: int | None  # ... with activation checkpointing
    checkpointing: bool  # the spec's train.activation_checkpointing

    @property
    def verdict(self) -> str:
        if self.fits:
            return "fits"
        if self.max_micro_batch and not self.checkpointing:
            return f"lower micro_batch_size to {self.max_micro_batch}"
        if self.max_micro_batch_ac:
            if self.checkpointing:
                return f"lower micro_batch_size to {self.max_micro_batch_ac}"
            return f"needs activation_checkpointing (micro batch <= {self.max_micro_batch_ac})"
        return "does not fit: more GPUs (FSDP shards states), more stages or lower lora_rank"


def gpu_capacity(gpu: str | None, memory: str | None) -> tuple[str, int]:
    """(label, bytes per GPU) from --gpu NAME or --gpu-memory SIZE."""
    if gpu is not None:
        key = gpu.lower()
        if key not in GPUS:
            raise UserError(f"unknown GPU {gpu!r}", fix=f"use one of {', '.join(GPUS)}, or give --gpu-memory 80GB")
        name, capacity = GPUS[key]
        return f"{key} ({name}, {capacity / GiB:.1f} GiB usable)", capacity
    assert memory is not None
    try:
        capacity = parse_bytes(memory)
    except ValueError as exc:
        raise UserError(f"--gpu-memory {memory!r}: {exc}", fix="write e.g. --gpu-memory 80GB or --gpu-memory 24GiB") from None
    return f"{format_bytes(capacity)} per GPU", capacity


def _with(spec: Spec, micro_batch: int | None = None, checkpointing: bool | None = None) -> Spec:
    """The spec under device accounting, with another micro batch / checkpointing (no revalidation needed:
    only these two fields change and the caller keeps the global batch divisible)."""
    train = spec.train.model_copy(update={
        "micro_batch_size": spec.train.micro_batch_size if micro_batch is None else micro_batch,
        "activation_checkpointing": spec.train.activation_checkpointing if checkpointing is None else checkpointing,
    })
    memory = spec.memory.model_copy(update={"accounting": "device"})
    return spec.model_copy(update={"train": train, "memory": memory})


def stage_peak(spec: Spec, new: int, old: int) -> int:
    """Per-GPU peak of a stage under the device accounting of `spec` (already switched by `_with`)."""
    from stepc.compiler.memory import costs_for, galore_stage_bytes

    costs = costs_for(spec)
    if spec.experiment.method == "galore":  # one stage of every layer; its projected moments are not AdamW's
        return galore_stage_bytes(spec, costs)
    return costs.stage_bytes(new, old)


def allowed_micro_batches(spec: Spec) -> list[int]:
    """Micro batch sizes the global batch can be split into on this many ranks, ascending."""
    tr, la = spec.train, spec.launch
    per = spec.model.seq_len * la.nnodes * la.nproc_per_node
    return [m for m in range(1, tr.global_batch_tokens // per + 1) if tr.global_batch_tokens % (per * m) == 0]


def fit(spec: Spec, plan: Plan, capacity: int) -> list[StageFit]:
    """Per stage: the device peak, whether it fits `capacity` bytes, and the largest micro batches that do."""
    sizes = allowed_micro_batches(spec)
    results = []
    for stage in plan.stages:
        new, old = stage.new_layers, stage.frozen_layers
        peak = stage_peak(_with(spec), new, old)
        best = {ac: max((m for m in sizes if stage_peak(_with(spec, m, ac), new, old) <= capacity), default=None)
                for ac in (False, True)}
        results.append(StageFit(stage.index, stage.total_layers, peak, peak <= capacity, best[False], best[True],
                                spec.train.activation_checkpointing))
    return results


def fit_table(spec: Spec, results: list[StageFit], label: str) -> str:
    tr, la = spec.train, spec.launch
    ranks = 1 if spec.experiment.method == "galore" else la.nnodes * la.nproc_per_node
    head = (f"will it fit on {label}: device accounting, {ranks} rank(s), micro_batch_size {tr.micro_batch_size}, "
            f"activation_checkpointing {'on' if tr.activation_checkpointing else 'off'}")
    rows = [("stage", "layers", "peak/GPU", "fits", "max micro batch", "with AC", "verdict")]
    for r in results:
        rows.append((str(r.index), str(r.layers), format_bytes(r.peak_bytes), "yes" if r.fits else "NO",
                     str(r.max_micro_batch or "-"), str(r.max_micro_batch_ac or "-"), r.verdict))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i == len(row) - 1 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))).rstrip()
             for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join([head, *lines, error_bound_note()])


def error_bound_note() -> str:
    if MEASURED_ERROR is None:
        return ("error bound: not measured yet (bench/gpu.py has not been run on a GPU); the peak is an "
                "unverified estimate, and CUDA context / NCCL buffers are not included")
    gpu, error, what = MEASURED_ERROR
    return f"error bound: within {100 * error:.1f}% of the measured peak on {gpu} ({what}; bench/gpu.py)"
