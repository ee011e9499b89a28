"""The FLOPs schedule (Appendix E): equal compute to a vanilla run, split across stages.

Vanilla:  C = 6 N T, N = non-embedding parameters, T = reference_steps * global_batch_tokens.
Stage i:  C_i = (6 N_trainable + f N_frozen) T_i with f = 2 (paper) or 4 ("backprop": a frozen layer
that carries adapters still back-propagates activations to the layers below it).
Stages before the last run `grow_at` of their nominal length (reference_steps); the last absorbs
the rest of the budget, rounded down to whole steps so the budget is never exceeded.
"""

from __future__ import annotations

from dataclasses import dataclass

from stepc.errors import UserError

FROZEN_FLOPS = {"paper": 2, "backprop": 4}


@dataclass(frozen=True)
class StageSchedule:
    steps: int
    nominal_steps: int  # the horizon of the stage's cosine schedule
    tokens: int
    flops: float


def flops_per_token(trainable: int, frozen: int, accounting: str) -> int:
    return 6 * trainable + FROZEN_FLOPS[accounting] * frozen


def vanilla_flops(layer_params: int, num_layers: int, reference_steps: int, batch_tokens: int) -> int:
    """The budget every method gets: C = 6 N T of the vanilla reference run (Appendix E)."""
    return 6 * num_layers * layer_params * reference_steps * batch_tokens


def stage_schedule(
    trainable: list[int], frozen: list[int], vanilla_params: int,
    reference_steps: int, batch_tokens: int, grow_at: float, accounting: str,
) -> list[StageSchedule]:
    """Steps per stage for non-embedding trainable/frozen parameter counts per stage."""
    budget = vanilla_flops(vanilla_params, 1, reference_steps, batch_tokens)
    out: list[StageSchedule] = []
    spent = 0
    last = len(trainable) - 1
    for i, (tr, fr) in enumerate(zip(trainable, frozen)):
        per_step = flops_per_token(tr, fr, accounting) * batch_tokens
        if i < last:
            steps = max(1, round(grow_at * reference_steps))
            nominal = reference_steps
        else:
            steps = (budget - spent) // per_step
            nominal = steps
            if steps < 1:
                raise UserError(
                    f"the earlier stages spend the whole FLOPs budget ({budget:.3e}); the last stage gets no steps",
                    key="step.grow_at", fix="lower grow_at, use fewer stages, or raise train.reference_steps")
        spent += steps * per_step
        out.append(StageSchedule(steps=steps, nominal_steps=nominal, tokens=steps * batch_tokens, flops=float(steps * per_step)))
    return out
