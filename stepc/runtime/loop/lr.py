"""Learning-rate schedule of one stage: a pure function of the step, so resuming needs no state.

Every stage re-warms to the stage-1 peak (Appendix F) and decays by cosine over its *nominal*
length (reference_steps for stages cut at grow_at, so growth happens at 75% of a full cosine).
With adapters, each merge at step m is followed by a linear re-warm over restart_warmup_steps:
ReLoRA's jagged cosine.
"""

from __future__ import annotations

import math


def lr_at(step: int, peak: float, warmup: int, nominal: int, min_ratio: float,
          reset_every: int | None = None, restart_warmup: int = 0, resets_from: int = 0) -> float:
    """LR for 0-based `step` within a stage; `reset_every` set when adapters merge periodically.

    `resets_from` is the first step at which merges may happen (ReLoRA's warm start).
    """
    floor = peak * min_ratio
    if step < warmup:
        lr = peak * (step + 1) / warmup
    else:
        span = max(1, nominal - warmup)
        progress = min(1.0, (step - warmup) / span)
        lr = floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    since = steps_since_restart(step, reset_every, resets_from)
    if since is not None and since < restart_warmup:
        lr *= (since + 1) / restart_warmup
    return lr


def steps_since_restart(step: int, reset_every: int | None, resets_from: int = 0) -> int | None:
    """Steps since the last adapter restart, or None before the first one.

    Restarts happen at resets_from + k * reset_every for k >= 1, and at resets_from itself when it
    is positive (ReLoRA's switch from full-rank to adapters is a restart too).
    """
    if not reset_every or step < resets_from:
        return None
    offset = step - resets_from
    if resets_from == 0 and offset < reset_every:
        return None
    return offset % reset_every


def is_merge_step(step: int, reset_every: int | None, resets_from: int = 0) -> bool:
    """True after optimizer step `step` (1-based count of steps done) when adapters merge."""
    return bool(reset_every) and step > resets_from and (step - resets_from) % reset_every == 0
