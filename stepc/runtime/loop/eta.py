"""The run's ETA: what remains of a run, in seconds, from the metrics.jsonl records written so far.

A stage's training steps are not the whole of its wall time. On a short run the rest dominates:
each stage script starts torchrun, builds the model and loads the data, its first steps are slow
(warm-up, allocator, compilation), and evaluations, checkpoints and the final export all take time
the steps' throughput does not show. An ETA from steps alone was 40% short on the tiny spec. So the
estimate is a sum of measured terms, each from the records (every record has "time", metrics.py):

  train       the current stage's remaining steps at its steady seconds per step (an exponential
              moving average over the log windows, the first window of each launch excluded: in it,
              an earlier stage's seconds per FLOP, or for the run's first window its own rate), then
              every later stage's FLOPs at the same seconds per FLOP
  warm-up     the first window's time beyond the steady rate: paid again by every later stage
  evals       the evaluations still to come ([eval] every_steps and each stage's last step), each at
              the measured seconds of one evaluation (before the first one: its tokens at a forward
              pass's share, a third, of the training FLOP rate)
  checkpoints the periodic checkpoints still to come, at the measured seconds of one
  start-up    each later stage's start, as measured for this stage: stage script start
              ("launched", stage.sh's clock) to the first step, plus the pause between an earlier
              stage's end and the next stage script's start (torchrun's teardown) once seen
  wind-down   each unfinished stage's end: last step to stage_end without the final evaluation
              (export, the carried optimizer state), as measured for an earlier stage; until one
              has ended, two checkpoints' time

Evaluation and checkpoint times are scaled between stages by the FLOPs per token (a wider or deeper
stage evaluates and saves proportionally more). The console prints `remaining()` at every train
record; tests/test_console.py replays a recorded run through this class and checks it against the
time that really remained.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

MAX_GAP = 600.0  # a longer pause between stages is a later relaunch, not a teardown
SMOOTHING = 0.5  # EMA weight of the newest window: recent enough to follow a changing rate, not one noisy window


@dataclass
class _Launch:
    """The current launch of a stage (a stage script's torchrun), as far as it has been seen."""
    stage: int
    last_step: int
    last_time: float
    first_window: tuple[int, float] | None = None  # (steps, seconds) of the launch's first train window
    steady: float | None = None  # EMA of seconds per step over the later windows


@dataclass
class RunEta:
    """`stages`: the plan's stages (.steps, .flops, .tokens); `eval_every`/`checkpoint_every`: [eval]
    every_steps and [train] checkpoint_every; `eval_tokens`: tokens one evaluation scores (for the
    estimate before any evaluation was measured)."""
    stages: Sequence[Any]
    eval_every: int
    checkpoint_every: int
    eval_tokens: int
    launch: _Launch | None = None
    startup: float | None = None
    per_flop: float | None = None  # EMA of steady seconds per FLOP over every stage seen
    warm: float | None = None  # the latest launch's first-window time beyond its steady rate
    gap: float = 0.0  # stage_end of one stage to the start of the next one's script (torchrun's teardown)
    wind_down: float | None = None
    eval_unit: float | None = None  # seconds of one evaluation per FLOP-per-token of its stage
    checkpoint_unit: float | None = None
    _last_train: dict[int, float] = field(default_factory=dict)  # stage -> time of its last train record
    _evals: dict[tuple[int, int], float] = field(default_factory=dict)  # (stage, step) -> eval seconds
    _ended: dict[int, float] = field(default_factory=dict)  # stage -> time of its stage_end record

    def _per_token(self, stage: int) -> float:
        s = self.stages[stage - 1]
        return s.flops / max(1, s.tokens)

    def observe(self, record: dict[str, Any]) -> None:
        """One metrics.jsonl record, in file order (all of an earlier stage's, then this stage's as written)."""
        event, stage, time, step = record.get("event"), record.get("stage"), record.get("time"), record.get("step", 0)
        if not (_number(time) and isinstance(stage, int) and 1 <= stage <= len(self.stages) and isinstance(step, int)):
            return
        seconds = record.get("seconds") if _number(record.get("seconds")) else None
        if event == "stage_start":
            self.launch = _Launch(stage, step, time)
            if _number(record.get("launched")):
                self.startup = max(0.0, time - record["launched"])
                ended = self._ended.get(stage - 1)
                if ended is not None and 0 <= record["launched"] - ended < MAX_GAP:
                    self.gap = record["launched"] - ended
        elif event == "train":
            self._window(stage, step, time, record)
            self._last_train[stage] = time
        elif event == "eval" and seconds is not None:
            self._evals[(stage, step)] = seconds
            self.eval_unit = _ema(self.eval_unit, seconds / self._per_token(stage))
        elif event == "checkpoint" and seconds is not None:
            self.checkpoint_unit = _ema(self.checkpoint_unit, seconds / self._per_token(stage))
        elif event == "stage_end":
            self._ended[stage] = time
            if stage in self._last_train:
                self.wind_down = max(0.0, time - self._last_train[stage] - self._evals.get((stage, step), 0.0))
        if event in ("eval", "checkpoint") and self.launch is not None and seconds is not None:
            self.launch.last_time += seconds  # a pause inside the current window is not training time

    def _window(self, stage: int, step: int, time: float, record: dict[str, Any]) -> None:
        launch = self.launch
        if launch is None or launch.stage != stage or step <= launch.last_step:
            self.launch = _Launch(stage, step, time)  # a resumed stage without its start record: measure from here
            return
        steps, seconds = step - launch.last_step, max(0.0, time - launch.last_time)
        s = self.stages[stage - 1]
        if launch.first_window is None:
            launch.first_window = (steps, seconds)
        else:
            launch.steady = _ema(launch.steady, seconds / steps)
            self.per_flop = _ema(self.per_flop, seconds / steps * s.steps / max(s.flops, 1e-9))
            first_steps, first_seconds = launch.first_window
            self.warm = max(0.0, first_seconds - first_steps * launch.steady)
        launch.last_step, launch.last_time = step, time

    def seconds_per_step(self) -> float | None:
        """The current stage's steady seconds per step; in its first window (warm-up) an earlier stage's
        steady seconds per FLOP, else (the run's first window) that window's own rate."""
        launch = self.launch
        if launch is None or launch.first_window is None:
            return None
        if launch.steady is not None:
            return launch.steady
        s = self.stages[launch.stage - 1]
        if self.per_flop is not None:
            return self.per_flop * s.flops / max(1, s.steps)
        steps, seconds = launch.first_window
        return seconds / steps

    def remaining(self, stage: int, done: int) -> tuple[float, float] | None:
        """(seconds left in this stage, seconds left in the run) after step `done` of `stage`, or None
        before the first train window of this launch."""
        per_step = self.seconds_per_step()
        if per_step is None:
            return None
        launch = self.launch
        assert launch is not None and launch.first_window is not None
        s = self.stages[stage - 1]
        per_flop = per_step * s.steps / max(s.flops, 1e-9)
        warm = self.warm or 0.0
        eval_unit = self.eval_unit
        if eval_unit is None:  # a forward pass over the eval tokens: a third of a training step's FLOPs per token
            eval_unit = self.eval_tokens * per_flop / 3
        checkpoint_unit = self.checkpoint_unit or 0.0

        def extras(index: int, after: int) -> float:
            """Evaluations and checkpoints of stage `index` after step `after`."""
            steps = self.stages[index - 1].steps
            evals = len([x for x in range(after + 1, steps) if x % self.eval_every == 0]) + 1  # + the final one
            saves = len([x for x in range(after + 1, steps) if x % self.checkpoint_every == 0])
            return self._per_token(index) * (evals * eval_unit + saves * checkpoint_unit)

        wind_down = self.wind_down if self.wind_down is not None else 2 * checkpoint_unit * self._per_token(stage)
        this_stage = (s.steps - done) * per_step + extras(stage, done) + wind_down
        later = sum(self.stages[j - 1].flops * per_flop + extras(j, 0) + self.gap + (self.startup or 0.0) + warm + wind_down
                    for j in range(stage + 1, len(self.stages) + 1))
        return this_stage, this_stage + later


def run_eta(stages: Sequence[Any], eval_every: int, checkpoint_every: int, eval_tokens: int,
            metrics: Path | None = None) -> RunEta:
    """A RunEta that has seen the records already in `metrics` (earlier stages: their wind-down and
    their evaluations' and checkpoints' times); lines that are not JSON objects are skipped."""
    eta = RunEta(stages, eval_every, checkpoint_every, eval_tokens)
    try:
        lines = metrics.read_text(encoding="utf-8").splitlines() if metrics is not None else []
    except OSError:
        lines = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            eta.observe(record)
    eta.launch = None  # this launch starts now
    return eta


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _ema(previous: float | None, value: float) -> float:
    return value if previous is None else SMOOTHING * value + (1 - SMOOTHING) * previous
