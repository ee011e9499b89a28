"""The FLOPs schedule (Appendix E): equal compute to a vanilla run, split across stages.

Vanilla:  C = 6 N T, N = non-embedding parameters, T = reference_steps * global_batch_tokens.
Stage i:  C_i = (6 N_trainable + f N_frozen) T_i with f = 2 (paper) or 4 ("backprop": a frozen layer
that carries adapters still back-propagates activations to the layers below it).
Stages before the last run `grow_at` of their nominal length (reference_steps), or, with
`grow_at_tokens` (cumulative tokens at each growth), up to floor(tokens / batch_tokens) steps since the
start of the run (nominal length: max(reference_steps, steps)); the last absorbs the rest of the
budget, rounded down to whole steps so the budget is never exceeded.
"""

from __future__ import annotations

from dataclasses import dataclass

from stepc.errors import UserError
from stepc.schema.shapes import budget_flops_per_token


@dataclass(frozen=True)
class StageSchedule:
    steps: int
    nominal_steps: int  # the horizon of the stage's cosine schedule
    tokens: int
    flops: float


def vanilla_flops(layer_params: int, num_layers: int, reference_steps: int, batch_tokens: int) -> int:
    """The budget every method gets: C = 6 N T of the vanilla reference run (Appendix E)."""
    return 6 * num_layers * layer_params * reference_steps * batch_tokens


def stage_schedule(
    trainable: list[int], frozen: list[int], vanilla_params: int,
    reference_steps: int, batch_tokens: int, grow_at: float, accounting: str,
    grow_at_tokens: list[int] | None = None,
) -> list[StageSchedule]:
    """Steps per stage for non-embedding trainable/frozen parameter counts per stage.

    grow_at_tokens (checked by stepc.compiler.checks: stages - 1 increasing counts, whole distinct steps)
    replaces grow_at when given.
    """
    budget = vanilla_flops(vanilla_params, 1, reference_steps, batch_tokens)
    out: list[StageSchedule] = []
    spent = 0
    last = len(trainable) - 1
    ends = None if grow_at_tokens is None else [t // batch_tokens for t in grow_at_tokens]  # cumulative steps
    if ends is not None and len(ends) != last:
        raise UserError(f"{len(ends)} growth times for {last} growths ({last + 1} stages)", key="step.grow_at_tokens",
                        fix=f"give {last} token counts, one per growth (or pin memory.stages)")
    for i, (tr, fr) in enumerate(zip(trainable, frozen)):
        per_step = budget_flops_per_token(tr, fr, accounting) * batch_tokens
        if i < last and ends is not None:
            steps = ends[i] - (ends[i - 1] if i else 0)
            nominal = max(reference_steps, steps)
        elif i < last:
            steps = max(1, round(grow_at * reference_steps))
            nominal = reference_steps
        else:
            steps = (budget - spent) // per_step
            nominal = steps
            if steps < 1:
                key, what = ("step.grow_at", "lower grow_at") if ends is None else ("step.grow_at_tokens", "grow earlier")
                raise UserError(
                    f"the earlier stages spend {spent:.4e} of the FLOPs budget of {budget:.4e}; the last stage gets no steps",
                    key=key, fix=f"{what}, use fewer stages, or raise train.reference_steps")
        spent += steps * per_step
        out.append(StageSchedule(steps=steps, nominal_steps=nominal, tokens=steps * batch_tokens, flops=float(steps * per_step)))
    return out
