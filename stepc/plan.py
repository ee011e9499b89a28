"""The plan pass: Spec -> Plan (stage layout, per-stage memory, parameters and FLOPs schedule).

A pure function of the spec; the result is plain JSON-ready data that goes into the manifest.
"""

from __future__ import annotations

from typing import Any

from stepc.errors import UserError
from stepc.layout import Layout, pinned_layout, solve_layout
from stepc.memory import Costs, costs_for, exact_costs, layout_peaks, vanilla_bytes
from stepc.schedule import StageSchedule, flops_per_token, stage_schedule
from stepc.spec import Spec
from stepc.units import format_bytes

AUTO_STAGES_LIMIT = 64  # "auto" tries K = 1, 2, ... up to this (or L); peaks flatten long before


def make_plan(spec: Spec) -> dict[str, Any]:
    """Solve the layout and the schedule for `spec` (already normalised)."""
    costs = costs_for(spec)
    layout = choose_layout(spec, costs)
    method = spec.experiment.method
    if method == "galore":
        peaks = [galore_bytes(spec, costs)]
    else:  # vanilla and relora hold the full model's states at their peak (ReLoRA's warm start is full-rank)
        peaks = layout_peaks(costs, layout.layers)
    schedule = _schedule(spec, costs, layout.layers)
    exact = exact_costs(spec)
    stages, old = [], 0
    for i, (new, peak, sched) in enumerate(zip(layout.layers, peaks, schedule), start=1):
        stages.append({
            "index": i, "new_layers": new, "total_layers": old + new, "frozen_layers": old,
            "trainable_params": costs.trainable_params(new, old), "frozen_params": costs.frozen_params(new, old),
            "peak_bytes": peak, "exact_model_state_bytes": exact.stage_bytes(new, old),
            "steps": sched.steps, "nominal_steps": sched.nominal_steps, "tokens": sched.tokens, "flops": sched.flops,
        })
        old += new
    vanilla = vanilla_bytes(costs, spec.model.num_layers)
    peak = max(peaks)
    return {
        "method": method, "accounting": spec.memory.accounting, "solver": layout.solver,
        "flops_accounting": spec.train.flops_accounting, "budget_bytes": spec.memory.budget,
        "vanilla_peak_bytes": vanilla, "peak_bytes": peak, "reduction": round(1 - peak / vanilla, 6),
        "flops_budget": float(6 * spec.model.num_layers * costs.layer_params * spec.train.reference_steps * spec.train.global_batch_tokens),
        "layers": layout.layers, "stages": stages,
    }


def choose_layout(spec: Spec, costs: Costs) -> Layout:
    """Pinned, fixed-K optimum, or the fewest stages that fit the budget; infeasible budgets are user errors."""
    mem, L = spec.memory, spec.model.num_layers
    if mem.layers is not None:
        layout = pinned_layout(costs, mem.layers)
    elif mem.stages == "auto":
        for k in range(1, min(L, AUTO_STAGES_LIMIT) + 1):
            layout = solve_layout(costs, L, k, mem.solver)
            if layout.peak_bytes <= mem.budget:
                return layout
        _raise_infeasible(spec, costs)
    else:
        layout = solve_layout(costs, L, mem.stages, mem.solver)
    if mem.budget is not None and spec.experiment.method == "step" and layout.peak_bytes > mem.budget:
        _raise_infeasible(spec, costs, layout)
    return layout


def _raise_infeasible(spec: Spec, costs: Costs, tried: Layout | None = None) -> None:
    mem, L = spec.memory, spec.model.num_layers
    counts = sorted({1, 2, 3, 4, 6, 8, min(L, AUTO_STAGES_LIMIT)} & set(range(1, L + 1)))
    best = {k: solve_layout(costs, L, k, mem.solver).peak_bytes for k in counts}
    table = ", ".join(f"K={k}: {format_bytes(b)}" for k, b in best.items())
    what = f"layout {tried.layers} peaks at {format_bytes(tried.peak_bytes)}" if tried else "no stage count fits"
    raise UserError(
        f"{what}, over the budget of {format_bytes(mem.budget)} ({mem.accounting} accounting). "
        f"Smallest achievable peak per stage count: {table}",
        key="memory.budget", fix="raise the budget, use more stages (or stages = \"auto\"), or a lower lora_rank")


def _schedule(spec: Spec, costs: Costs, layers: list[int]):
    tr, st, method, L = spec.train, spec.step, spec.experiment.method, spec.model.num_layers
    P, E = costs.layer_params, costs.adapter_params
    if method == "relora":  # full-rank warm start, then adapters on every layer (ReLoRA, Lialin et al.)
        warm = st.relora_warm_start_steps
        budget = 6 * L * P * tr.reference_steps * tr.global_batch_tokens
        lora_step = flops_per_token(L * E, L * P, tr.flops_accounting) * tr.global_batch_tokens
        steps = warm + (budget - 6 * L * P * warm * tr.global_batch_tokens) // lora_step
        return [StageSchedule(steps=steps, nominal_steps=steps, tokens=steps * tr.global_batch_tokens,
                              flops=float(6 * L * P * warm * tr.global_batch_tokens + (steps - warm) * lora_step))]
    trainable, frozen, old = [], [], 0
    for new in layers:
        trainable.append(new * P + old * E)
        frozen.append(old * P)
        old += new
    return stage_schedule(trainable, frozen, L * P, tr.reference_steps, tr.global_batch_tokens, st.grow_at, tr.flops_accounting)


def galore_bytes(spec: Spec, costs: Costs) -> int:
    """GaLore model states: weights and gradients (16-bit) plus fp32 master copy for every parameter,
    and for each 2-D layer matrix (m x n) Adam moments in the rank-r projected space plus the projector.

    Outside the decoder layers (embeddings, head, norms) GaLore keeps ordinary AdamW state.
    """
    m, r = spec.model, spec.step.galore_rank
    d, inter = m.hidden_size, m.intermediate_size
    kv = m.num_key_value_heads * (d // m.num_attention_heads)
    if spec.memory.accounting == "paper":
        inter, kv = round(8 / 3 * d), d
    mats = [(d, d), (d, kv), (d, kv), (d, d), (d, inter), (d, inter), (inter, d)]
    projected = sum(2 * 4 * r * max(a, b) + 4 * min(a, b) * r for a, b in mats)  # moments r x max, projector min x r
    per_layer = 8 * costs.layer_params + projected
    return m.num_layers * per_layer + 16 * costs.fixed_params
