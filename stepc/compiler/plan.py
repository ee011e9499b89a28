"""The plan pass: Spec -> Plan (stage layout, per-stage memory, parameters and FLOPs schedule).

A pure function of the spec; the typed `Plan` (stepc.schema.plan) goes into the manifest.
"""

from __future__ import annotations

from dataclasses import dataclass

from stepc.compiler.layout import Layout, layout_feasible, pinned_layout, solve_layout
from stepc.compiler.memory import Costs, costs_for, exact_costs, galore_stage_bytes, vanilla_bytes
from stepc.compiler.schedule import StageSchedule, stage_schedule, vanilla_flops
from stepc.compiler.static_checks import plan_problems
from stepc.errors import UserError
from stepc.schema.plan import Plan, SftPlan, StagePlan
from stepc.schema.shapes import budget_flops_per_token
from stepc.schema.spec import Spec
from stepc.schema.units import format_bytes

AUTO_STAGES_LIMIT = 64  # "auto" tries K = 1, 2, ... up to this (or L); peaks flatten long before


@dataclass(frozen=True)
class Phase:
    """One runtime stage as the method lays it out, before its memory is counted."""

    new: int  # decoder layers it adds
    old: int  # layers from earlier stages
    schedule: StageSchedule
    lr_offset: int = 0  # where it starts on a schedule shared with the previous phase (ReLoRA)


def make_plan(spec: Spec, sft: SftPlan | None = None) -> Plan:
    """Solve the layout and the schedule for `spec` (already normalised). `sft`: method "sft"'s init_from
    and instruction data (stepc.compiler.sft.resolve); without it an SFT plan has 0 steps (unresolved)."""
    costs, exact = costs_for(spec), exact_costs(spec)
    layout = choose_layout(spec, costs)
    method = spec.method
    galore = method.optimizer == "galore"
    keeps_training = method.old_layers == "trained"
    stages, data_offset = [], 0
    for i, phase in enumerate(_phases(spec, costs, layout.layers, sft), start=1):
        new, old, sched = phase.new, phase.old, phase.schedule
        # old layers that keep training: the stage costs what a vanilla model of old + new layers does
        trained, frozen = (new + old, 0) if keeps_training else (new, old)
        # AdamW state handed over from stage i-1 (embeddings, final norm, head; old layers too when they
        # keep training: stepc/runtime/model/carry.py). Memory is unchanged: they hold those moments from
        # their first step on either way.
        carried = exact.fixed_params + (old * exact.layer_params if keeps_training else 0)
        stages.append(StagePlan(**{
            "index": i, "new_layers": new, "total_layers": old + new, "frozen_layers": frozen,
            "trainable_params": costs.trainable_params(trained, frozen), "frozen_params": costs.frozen_params(trained, frozen),
            "peak_bytes": galore_stage_bytes(spec, costs) if galore else costs.stage_bytes(trained, frozen),
            # GaLore's projected moments live in optimizer objects the runtime does not measure tensor by tensor.
            "exact_model_state_bytes": None if galore else exact.stage_bytes(trained, frozen),
            "steps": sched.steps, "nominal_steps": sched.nominal_steps, "tokens": sched.tokens, "flops": sched.flops,
            "lr_offset": phase.lr_offset,
            "data_step_offset": data_offset,  # each stage reads on where the last stopped: no batch is seen twice
            "carried_optimizer_params": carried if spec.step.carry_optimizer_state and i > 1 else 0,
        }))
        data_offset += sched.steps
    vanilla = vanilla_bytes(costs, spec.model.num_layers)
    peak = max(s.peak_bytes for s in stages)
    if method.schedule == "epochs":  # no FLOPs budget to share: the budget is what the epochs cost
        flops_budget = sum(s.flops for s in stages)
    else:
        flops_budget = float(vanilla_flops(costs.layer_params, spec.model.num_layers, spec.train.reference_steps,
                                           spec.train.global_batch_tokens))
    plan = Plan(**{
        "method": method.name, "accounting": spec.memory.accounting, "solver": layout.solver,
        "flops_accounting": spec.train.flops_accounting, "budget_bytes": spec.memory.budget,
        "vanilla_peak_bytes": vanilla, "peak_bytes": peak, "reduction": round(1 - peak / vanilla, 6),
        "flops_budget": flops_budget, "layers": layout.layers, "stages": stages, "sft": sft,
    })
    for key, problem, fix in plan_problems(spec, plan):  # warmups and merges vs stage lengths, budget for baselines
        raise UserError(problem, key=key, fix=fix)
    return plan


def _phases(spec: Spec, costs: Costs, layers: list[int], sft: SftPlan | None) -> list[Phase]:
    """The runtime stages of each method: (new layers, frozen layers, schedule, global LR offset).

    STEP, growth and vanilla: one per layout entry, each with its own LR schedule. ReLoRA: a full-rank warm
    start, then a phase that adds no layer and puts adapters on all of them, on one global jagged
    cosine (so the second phase's LR continues at `lr_offset`). GaLore: one stage. SFT: one stage that
    trains every layer of the init_from model for ceil(epochs x examples / batch_size) steps, each of
    batch_size padded rows (global_batch_tokens), at 6 N FLOPs per (padded) token.
    """
    tr, st, L = spec.train, spec.step, spec.model.num_layers
    P, E = costs.layer_params, costs.adapter_params
    if spec.method.schedule == "epochs":
        from stepc.compiler.sft import steps as sft_steps

        steps, batch = sft_steps(spec, sft), tr.global_batch_tokens
        return [Phase(L, 0, StageSchedule(steps, steps, steps * batch, float(6 * L * P * steps * batch)))]
    if spec.method.schedule == "relora":
        warm, batch = st.relora_warm_start_steps, tr.global_batch_tokens
        budget = vanilla_flops(P, L, tr.reference_steps, batch)
        lora_step = budget_flops_per_token(L * E, L * P, tr.flops_accounting) * batch
        lora_steps = (budget - 6 * L * P * warm * batch) // lora_step
        total = warm + lora_steps
        return [Phase(L, 0, StageSchedule(warm, total, warm * batch, float(6 * L * P * warm * batch))),
                Phase(0, L, StageSchedule(lora_steps, total, lora_steps * batch, float(lora_steps * lora_step)), warm)]
    trainable, frozen, old = [], [], 0
    for new in layers:
        if spec.method.old_layers == "trained":  # the whole grown model trains
            trainable.append((old + new) * P)
            frozen.append(0)
        else:
            trainable.append(new * P + old * E)
            frozen.append(old * P)
        old += new
    schedule = stage_schedule(trainable, frozen, L * P, tr.reference_steps, tr.global_batch_tokens, st.grow_at,
                              tr.flops_accounting, st.grow_at_tokens)
    phases, old = [], 0
    for new, sched in zip(layers, schedule):
        phases.append(Phase(new, old, sched))
        old += new
    return phases


def layer_multiple(spec: Spec) -> int:
    """Every growth must add a multiple of this many layers (1: no constraint): a stacking operator
    with a fixed block (step.stack_block) copies whole blocks."""
    st = spec.step
    if spec.method.grows and st.growth_operator in ("stack", "stack-middle") and st.stack_block:
        return st.stack_block
    return 1


def choose_layout(spec: Spec, costs: Costs) -> Layout:
    """Pinned, fixed-K optimum, or the fewest stages that fit the budget; infeasible budgets are user errors."""
    mem, L = spec.memory, spec.model.num_layers
    multiple = layer_multiple(spec)
    if spec.method.grows and not spec.method.solves_layout:  # checks require pinned layers; the last stage is the whole model
        layout = Layout(list(mem.layers), costs.stage_bytes(L, 0), "pinned")
    elif mem.layers is not None:
        layout = pinned_layout(costs, mem.layers)
    elif mem.stages == "auto":
        for k in range(1, min(L, AUTO_STAGES_LIMIT) + 1):
            if not layout_feasible(L, k, multiple):
                break
            layout = solve_layout(costs, L, k, mem.solver, multiple)
            if layout.peak_bytes <= mem.budget:
                return layout
        _raise_infeasible(spec, costs)
    else:
        layout = solve_layout(costs, L, mem.stages, mem.solver, multiple)
    if mem.budget is not None and spec.method.grows and layout.peak_bytes > mem.budget:
        _raise_infeasible(spec, costs, layout)
    return layout


def _raise_infeasible(spec: Spec, costs: Costs, tried: Layout | None = None) -> None:
    mem, L, multiple = spec.memory, spec.model.num_layers, layer_multiple(spec)
    counts = sorted(k for k in {1, 2, 3, 4, 6, 8, min(L, AUTO_STAGES_LIMIT)} if k <= L and layout_feasible(L, k, multiple))
    best = {k: solve_layout(costs, L, k, mem.solver, multiple).peak_bytes for k in counts}
    table = ", ".join(f"K={k}: {format_bytes(b)}" for k, b in best.items())
    what = f"layout {tried.layers} peaks at {format_bytes(tried.peak_bytes)}" if tried else "no stage count fits"
    raise UserError(
        f"{what}, over the budget of {format_bytes(mem.budget)} ({mem.accounting} accounting). "
        f"Smallest achievable peak per stage count: {table}",
        key="memory.budget", fix="raise the budget, use more stages (or stages = \"auto\"), or a lower lora_rank")
