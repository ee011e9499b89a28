"""The plan table printed by `stepc plan`/`compile` and written to plan.md."""

from __future__ import annotations

from stepc.schema.plan import Plan
from stepc.schema.units import MODEL_STATE, UNIT_NOTE, format_bytes

COLUMNS = ("stage", "layers", "new", "trainable", "frozen", "peak", "steps", "tokens", "FLOPs")


def format_tokens(tokens: int) -> str:
    """Billions from 1e8 up, millions below (a CPU-sized run's 5,120 tokens are 0.005M, not 0.00B)."""
    return f"{tokens / 1e9:.3f}B" if tokens >= 1e8 else f"{tokens / 1e6:.3f}M"


def plan_table(plan: Plan) -> str:
    rows = [COLUMNS]
    rows.append(("vanilla", str(sum(plan.layers)), "", "", "", format_bytes(plan.vanilla_peak_bytes), "", "",
                 f"{plan.flops_budget:.3e}"))
    for s in plan.stages:
        rows.append((
            str(s.index), str(s.total_layers), str(s.new_layers), f"{s.trainable_params / 1e6:.2f}M",
            f"{s.frozen_params / 1e6:.2f}M", format_bytes(s.peak_bytes), str(s.steps),
            format_tokens(s.tokens), f"{s.flops:.3e}",
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    lines = ["  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join([*lines, peak_legend(plan)])


def peak_legend(plan: Plan) -> str:
    """What a plan's "peak" is: model-state bytes, not what a device holds (`stepc plan --gpu` predicts that)."""
    return f"peak: {MODEL_STATE}, memory.accounting \"{plan.accounting}\"; {UNIT_NOTE}"


def plan_summary(plan: Plan) -> str:
    text = (f"{plan.method}: layout {plan.layers}, peak {format_bytes(plan.peak_bytes)} vs vanilla "
            f"{format_bytes(plan.vanilla_peak_bytes)} ({100 * plan.reduction:.1f}% less)")
    if plan.budget_bytes is not None:
        text += f", budget {format_bytes(plan.budget_bytes)}"  # a plan over its budget is refused (checks)
    if plan.sft is not None:
        text += "\n" + sft_summary(plan)
    return text


def sft_summary(plan: Plan) -> str:
    """Where an SFT run starts and how its steps were counted (or why they are not known yet)."""
    sft, steps = plan.sft, sum(s.steps for s in plan.stages)
    origin = "init_from not finished yet"
    if sft.init_from is not None:
        weights = sorted(name for name in sft.init_from.export if name.endswith(".safetensors"))
        first = f"{weights[0]} sha256 {sft.init_from.export[weights[0]][:12]}" if weights else "export"
        origin = f"tunes {sft.init_from.run_dir} ({sft.init_from.method} run {sft.init_from.experiment!r}, {first})"
    if sft.unresolved:
        return f"sft: {origin}; steps unknown: {sft.unresolved}"
    return f"sft: {origin}; {sft.examples} examples in {len(sft.data or [])} file(s) -> {steps} steps"


def compare_plans(plans: list[tuple[str, Plan]]) -> str:
    """Several plans side by side: method, layout, peak, reduction, total steps, tokens and FLOPs."""
    rows = [("spec", "method", "layout", "peak", "vs vanilla", "steps", "tokens", "FLOPs")]
    for name, plan in plans:
        stages = plan.stages
        rows.append((name, plan.method, "+".join(str(s.new_layers) for s in stages), format_bytes(plan.peak_bytes),
                     f"-{100 * plan.reduction:.1f}%", str(sum(s.steps for s in stages)),
                     format_tokens(sum(s.tokens for s in stages)), f"{sum(s.flops for s in stages):.3e}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) if i < 3 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths))) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join([*lines, f"peak: {MODEL_STATE}, each by its spec's memory.accounting; {UNIT_NOTE}"])
