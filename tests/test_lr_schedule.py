"""The LR schedule pinned to numbers worked out by hand from its definition, not from `lr_at`'s helpers.

The contract (README "Runtime", spec docstring of `train.warmup_steps`/`min_lr_ratio`): linear warmup
over `warmup_steps` (step s, 0-based, gets peak * (s + 1) / warmup), then cosine decay from the peak
to `min_lr_ratio * peak` over the rest of the stage's *nominal* length, flat at the floor after it.
ReLoRA restarts multiply by (k + 1) / restart_warmup for the k-th step after a restart. Every stage
re-warms to the stage-1 peak. The expected values below are written out as numbers (warmup, floor) or
as the cosine formula evaluated at a few points, so a change of the schedule's shape fails here.
"""

from __future__ import annotations

import math

import pytest

from stepc.runtime.loop.lr import lr_at

PEAK, WARMUP, NOMINAL, FLOOR_RATIO = 1e-3, 10, 110, 0.1


@pytest.mark.parametrize("step, expected", [
    (0, 1e-4),      # first step: peak / warmup, not 0
    (4, 5e-4),
    (9, 1e-3),      # the warmup ends at the peak after exactly `warmup` steps
    (10, 1e-3),     # cosine starts at the peak (progress 0)
    (35, 1e-4 + 0.9e-3 * 0.5 * (1 + math.sqrt(0.5))),  # a quarter of the decay: cos(pi/4)
    (60, 5.5e-4),   # half way: the mean of peak and floor
    (85, 1e-4 + 0.9e-3 * 0.5 * (1 - math.sqrt(0.5))),  # three quarters: cos(3 pi/4)
    (110, 1e-4),    # the end of the nominal length: the floor
    (500, 1e-4),    # and it stays there (a stage running past its nominal length)
])
def test_warmup_then_cosine_to_the_floor(step, expected):
    assert lr_at(step, PEAK, WARMUP, NOMINAL, FLOOR_RATIO) == pytest.approx(expected, rel=1e-12)


def test_zero_floor_and_no_warmup():
    # min_lr_ratio = 0 decays to exactly 0; warmup = 0 starts at the peak
    assert lr_at(0, 2e-3, 0, 100, 0.0) == pytest.approx(2e-3, rel=1e-12)
    assert lr_at(50, 2e-3, 0, 100, 0.0) == pytest.approx(1e-3, rel=1e-12)
    assert lr_at(100, 2e-3, 0, 100, 0.0) == 0.0


def _cosine(step: int, peak: float, warmup: int, nominal: int, ratio: float) -> float:
    """The README's cosine written out (for steps after the warmup)."""
    floor = ratio * peak
    return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / (nominal - warmup))))


def test_relora_restarts_rewarm_linearly_over_restart_warmup():
    # ReLoRA: full-rank until step 20, then a restart at 20 (the switch to adapters) and every 10 steps
    peak, warmup, nominal, reset, rewarm, start = 1e-3, 2, 200, 10, 4, 20
    lr = lambda s: lr_at(s, peak, warmup, nominal, 0.1, reset, rewarm, start)
    for s in (0, 1):
        assert lr(s) == pytest.approx(peak * (s + 1) / 2, rel=1e-12)
    for s in (5, 19):  # before the first restart: the plain cosine
        assert lr(s) == pytest.approx(_cosine(s, peak, warmup, nominal, 0.1), rel=1e-12)
    for restart in (20, 30, 120):
        for k, factor in enumerate((0.25, 0.5, 0.75, 1.0)):  # 1/4, 2/4, 3/4, 4/4 of the cosine
            s = restart + k
            assert lr(s) == pytest.approx(factor * _cosine(s, peak, warmup, nominal, 0.1), rel=1e-12), (restart, k)
        assert lr(restart + 4) == pytest.approx(_cosine(restart + 4, peak, warmup, nominal, 0.1), rel=1e-12)
    # STEP's adapters (resets_from = 0): no restart at step 0, the first at reset_every
    step_lr = lambda s: lr_at(s, peak, warmup, nominal, 0.1, 8, 2, 0)
    assert step_lr(0) == pytest.approx(peak / 2, rel=1e-12) and step_lr(1) == pytest.approx(peak, rel=1e-12)
    assert step_lr(8) == pytest.approx(0.5 * _cosine(8, peak, warmup, nominal, 0.1), rel=1e-12)
    assert step_lr(9) == pytest.approx(_cosine(9, peak, warmup, nominal, 0.1), rel=1e-12)
    assert step_lr(16) == pytest.approx(0.5 * _cosine(16, peak, warmup, nominal, 0.1), rel=1e-12)


def test_every_stage_rewarms_to_the_peak_and_decays_over_its_nominal_length(full_run):
    """The runtime's logged LR (train events every 10 steps) against the formula, stage by stage.

    The test spec: lr 3e-3, warmup 4, min_lr_ratio 0.1 (default), stage 1 runs 18 of a nominal 24
    steps (grow_at 0.75), stage 2 runs 20 of 20; adapters restart every 8 with a 2-step re-warm.
    """
    from conftest import read_metrics

    logged = {(m["stage"], m["step"]): m["lr"] for m in read_metrics(full_run) if m["event"] == "train"}
    peak, floor = 3e-3, 3e-4
    cos = lambda done, nominal: floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * (done - 1 - 4) / (nominal - 4)))
    expected = {
        (1, 10): cos(10, 24),   # step 9 of stage 1: 5/20 of the way down
        (1, 18): cos(18, 24),   # stage 1 stops at 13/20 of its cosine (growth at 75%), not at the floor
        (2, 10): cos(10, 20),   # stage 2 re-warmed to the peak and decays over its own 20 steps
        (2, 20): cos(20, 20),
    }
    assert set(expected) <= set(logged), sorted(logged)
    for key, value in expected.items():
        assert logged[key] == pytest.approx(value, rel=1e-9), (key, logged[key], value)
    assert logged[(2, 10)] > logged[(1, 18)]  # the re-warm: stage 2 is back above where stage 1 stopped
