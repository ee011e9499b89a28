"""Will it fit: `stepc plan SPEC --gpu h100-80gb` (or `--gpu-memory 80GB`) before anything is queued.

For every stage of the plan's layout, the per-GPU peak comes from the compiler's `device`
accounting (stepc.compiler.memory.costs_for on the spec with accounting = "device"; this module never
restates that formula, so corrections to it reach this answer unchanged). It then searches the
micro batch sizes the global batch allows (global_batch_tokens a multiple of seq_len x micro
batch x ranks) for the largest that fits, without and with activation checkpointing.

A stage fits when the estimate plus headroom is at most the GPU's memory. The headroom covers what
the estimate leaves out, both measured by bench/gpu.py on one H200 (bench/records/): the caching
allocator's reserved-but-unallocated slack (fragmentation), 4-12% of the estimate over the real-size
stages, and the memory outside the allocator (CUDA context, NCCL, cuBLAS workspaces), 1.39 GB on one
rank. The defaults round both up; `--headroom` and `--overhead` replace them. The estimate's own
error against torch.cuda.max_memory_allocated is MEASURED_ERROR below, printed under the table.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from stepc.errors import UserError
from stepc.schema.plan import Plan
from stepc.schema.spec import Spec
from stepc.schema.units import DEVICE_PEAK, UNIT_NOTE, format_bytes, parse_bytes

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
# bench/gpu.py's last run (bench/records/gpu-h200-2026-12-04-run*.json). None: not checked on a GPU.
MEASURED_ERROR: tuple[str, float, str] | None = (
    "NVIDIA H200", 0.067, "9 stages at the 368M and 1.2B shapes, bf16, one GPU, with and without gradient "
    "accumulation and activation checkpointing; the estimate was above the measurement in every one")
ALLOCATOR_SLACK = 0.12  # reserved / estimate - 1: at most 11.8% over those stages (bench/records/)
OUTSIDE_ALLOCATOR = 1_500_000_000  # CUDA context + NCCL + cuBLAS: 1.39 GB measured with one rank on an H200


@dataclass(frozen=True)
class Headroom:
    """What a stage needs beyond the estimate: a fraction of it (allocator slack) plus fixed bytes."""

    slack: float = ALLOCATOR_SLACK
    overhead: int = OUTSIDE_ALLOCATOR

    def needs(self, peak: int) -> int:
        return math.ceil(peak * (1 + self.slack)) + self.overhead

    def describe(self) -> str:
        return f"estimate + {100 * self.slack:g}% allocator slack + {format_bytes(self.overhead)} outside the allocator"


def parse_headroom(slack: str | None, overhead: str | None) -> Headroom:
    """--headroom PCT (e.g. 12% or 0.12) and --overhead SIZE (e.g. 1.5GB), each defaulting to the measured one."""
    out = Headroom()
    if slack is not None:
        text = slack.strip()
        try:
            value = float(text[:-1]) / 100 if text.endswith("%") else float(text)
        except ValueError:
            value = -1.0
        if not 0 <= value < 10:
            raise UserError(f"--headroom {slack!r} is not a fraction of the estimate",
                            fix="write e.g. --headroom 12% or --headroom 0.12 (0 for none)")
        out = Headroom(value, out.overhead)
    if overhead is not None:
        try:
            out = Headroom(out.slack, parse_bytes(overhead))
        except ValueError as exc:
            raise UserError(f"--overhead {overhead!r}: {exc}", fix="write e.g. --overhead 1.5GB (0B for none)") from None
    return out


@dataclass(frozen=True)
class StageFit:
    index: int
    layers: int
    peak_bytes: int  # per GPU, at the spec's micro batch and activation checkpointing
    needed_bytes: int  # peak_bytes with the headroom
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
        return f"{key} ({name}, {format_bytes(capacity)} usable)", capacity
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
    if spec.method.optimizer == "galore":  # one stage of every layer; its projected moments are not AdamW's
        return galore_stage_bytes(spec, costs)
    return costs.stage_bytes(new, old)


def allowed_micro_batches(spec: Spec) -> list[int]:
    """Micro batch sizes the global batch can be split into on this many ranks, ascending."""
    tr, la = spec.train, spec.launch
    per = spec.model.seq_len * la.nnodes * la.nproc_per_node
    return [m for m in range(1, tr.global_batch_tokens // per + 1) if tr.global_batch_tokens % (per * m) == 0]


def fit(spec: Spec, plan: Plan, capacity: int, headroom: Headroom = Headroom()) -> list[StageFit]:
    """Per stage: the device peak, whether it fits `capacity` bytes with `headroom`, and the largest
    micro batches that do."""
    sizes = allowed_micro_batches(spec)
    results = []
    for stage in plan.stages:
        new, old = stage.new_layers, stage.frozen_layers
        peak = stage_peak(_with(spec), new, old)
        best = {ac: max((m for m in sizes if headroom.needs(stage_peak(_with(spec, m, ac), new, old)) <= capacity),
                        default=None) for ac in (False, True)}
        needed = headroom.needs(peak)
        results.append(StageFit(stage.index, stage.total_layers, peak, needed, needed <= capacity, best[False], best[True],
                                spec.train.activation_checkpointing))
    return results


def fit_table(spec: Spec, results: list[StageFit], label: str, headroom: Headroom = Headroom()) -> str:
    tr, la = spec.train, spec.launch
    ranks = la.nnodes * la.nproc_per_node if spec.method.shards else 1
    head = (f"will it fit on {label}: device accounting, {ranks} rank(s), micro_batch_size {tr.micro_batch_size}, "
            f"activation_checkpointing {'on' if tr.activation_checkpointing else 'off'}")
    rows = [("stage", "layers", "estimate/GPU", "needs/GPU", "fits", "max micro batch", "with AC", "verdict")]
    for r in results:
        rows.append((str(r.index), str(r.layers), format_bytes(r.peak_bytes), format_bytes(r.needed_bytes),
                     "yes" if r.fits else "NO", str(r.max_micro_batch or "-"), str(r.max_micro_batch_ac or "-"), r.verdict))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i == len(row) - 1 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))).rstrip()
             for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    notes = [f"{DEVICE_PEAK}; {UNIT_NOTE}", f"needs = {headroom.describe()} (--headroom, --overhead)", error_bound_note()]
    speed = padding_note(spec)
    return "\n".join([head, *lines, *notes, *([speed] if speed else [])])


def explain(spec: Spec, plan: Plan, headroom: Headroom = Headroom()) -> str:
    """`--explain`: each stage's per-GPU estimate term by term (the device accounting's own terms,
    summing to the table's estimate), then the headroom that makes it what the stage needs."""
    from stepc.compiler.memory import costs_for

    tr = spec.train
    lines = []
    for stage in plan.stages:
        new, old = stage.new_layers, stage.frozen_layers
        peak = stage_peak(_with(spec), new, old)
        lines.append(f"\nstage {stage.index}: {stage.total_layers} layers ({new} trained, {old} frozen), micro batch "
                     f"{tr.micro_batch_size} x {spec.model.seq_len} tokens, estimate {format_bytes(peak)} per GPU")
        if spec.method.optimizer == "galore":
            lines.append("  (GaLore's projected optimizer state is not broken down term by term)")
        else:
            terms = costs_for(_with(spec)).terms(new, old)
            width = max(len(name) for name, _ in terms)
            lines += [f"  {name:<{width}}  {format_bytes(value):>10}" for name, value in terms]
        slack = headroom.needs(peak) - headroom.overhead - peak
        lines.append(f"  + allocator slack {100 * headroom.slack:g}% {format_bytes(slack)}, outside the allocator "
                     f"{format_bytes(headroom.overhead)}: needs {format_bytes(headroom.needs(peak))}")
    return "\n".join(lines)


GEMM_MULTIPLE = 128  # widths that are multiples of this ran at full speed on the H200 (bench/gpu.py's GEMM table)


def padding_note(spec: Spec) -> str | None:
    """A speed-up to name when the vocabulary or MLP width is an odd GEMM width: on an H200 such
    GEMMs ran 2.9-5.9x slower than at the next multiple of 128, and whole 368M/1.2B steps 2.2-2.3x."""
    m = spec.model
    odd = []
    if m.embedding_rows % GEMM_MULTIPLE:
        odd.append(f"model.vocab_multiple_of = {GEMM_MULTIPLE} ({m.embedding_rows} -> "
                   f"{-(-m.embedding_rows // GEMM_MULTIPLE) * GEMM_MULTIPLE} rows)")
    if m.intermediate_size % GEMM_MULTIPLE:
        odd.append(f"model.intermediate_multiple_of = {GEMM_MULTIPLE} (MLP width {m.intermediate_size} -> "
                   f"{-(-m.intermediate_size // GEMM_MULTIPLE) * GEMM_MULTIPLE})")
    if not odd:
        return None
    return ("speed-up: set " + " and ".join(odd) + ": GEMMs of these widths ran 2.9-5.9x slower than padded ones on an "
            "H200, whole 368M and 1.2B steps 2.2-2.3x (bench/gpu.py); it adds parameters, so leave it off to reproduce the "
            "paper's counts")


def error_bound_note() -> str:
    if MEASURED_ERROR is None:
        return ("error bound: not measured yet (bench/gpu.py has not been run on a GPU); the peak is an "
                "unverified estimate, and CUDA context / NCCL buffers are not included")
    gpu, error, what = MEASURED_ERROR
    return (f"error bound: the estimate is within {100 * error:.1f}% of the peak allocated measured on an {gpu} "
            f"({what}; bench/gpu.py)")
