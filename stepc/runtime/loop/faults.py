"""Fault injection for the tests: deterministic points where a stage can be stopped from outside.

STEPC_FAULT_PAUSE_AT=<point> with STEPC_FAULT_PAUSE_FILE=<path>: when a rank reaches `point`
(e.g. "growth": the grown model's shards just filled from stage i-1's export, before the optimizer
exists), it writes <path>.rank<RANK> and
sleeps until killed, so a test can kill -9 the stage exactly there rather than racing a metric
written later.

STEPC_FAULT_HOLD_AFTER_STEP=I:N: after step N of stage I, when the stage started before step N, every
rank waits until it is told to stop (a stop signal, or the stage script's STOP_REQUEST on rank 0), so a test can
have a real SLURM time-limit warning (sent some 0-30 s late, whenever slurmctld checks) land in the
middle of a stage however fast or slow the machine is. A resumed stage does not hold again. With
STEPC_FAULT_HOLD_FILE=<path>, a held rank writes <path>.rank<RANK> first; with
STEPC_FAULT_HOLD_RELEASE=<path>, it also goes on training once <path> exists (a test that killed the
launcher lets the orphaned ranks finish the stage).

STEPC_DUMP_FIRST_BATCH=<prefix>: every rank saves the first micro-batch it trains on in stage I (the
token ids, as numpy) to <prefix>.stage<I>.rank<RANK>.npy, so a test can compare what the stage really
read with the sampler's batch at the stage's data offset.

STEPC_FAULT_OOM_AT_STEP=N raises torch.OutOfMemoryError in (1-based) step N, as a CUDA allocation would;
STEPC_FAULT_NONFINITE_AT_STEP=N treats the loss of step N as NaN, exercising the non-finite-loss stop
without waiting for a real divergence; STEPC_DUMP_OPTIMIZER_AT_START=FILE writes the optimizer state a
fresh stage starts with (after any carry) to FILE, so tests can compare carried moments bit for bit.

The training loop sees all of them through one `Faults` object, read once from the environment.
Unset (always, outside tests), every hook is a no-op.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any


def pause_point(name: str) -> None:
    if os.environ.get("STEPC_FAULT_PAUSE_AT", "") != name:
        return
    marker = Path(os.environ["STEPC_FAULT_PAUSE_FILE"] + f".rank{os.environ.get('RANK', '0')}")
    marker.write_text(f"paused at {name}\n")
    while True:  # until the test kills the stage
        time.sleep(1)


HOLD_LIMIT_S = 600  # a test that never signals fails on its own timeout, not on a stage that sleeps forever


def hold_after_step(stage: int, done: int, started_at: int, stop_requested: Callable[[], bool]) -> None:
    value = os.environ.get("STEPC_FAULT_HOLD_AFTER_STEP", "").strip()
    if value != f"{stage}:{done}" or started_at >= done:
        return
    if os.environ.get("STEPC_FAULT_HOLD_FILE"):  # tell the test this rank is held
        Path(os.environ["STEPC_FAULT_HOLD_FILE"] + f".rank{os.environ.get('RANK', '0')}").write_text(f"held after step {done}\n")
    release = os.environ.get("STEPC_FAULT_HOLD_RELEASE")
    deadline = time.monotonic() + HOLD_LIMIT_S
    while not stop_requested() and not (release and Path(release).exists()) and time.monotonic() < deadline:
        time.sleep(0.2)


def tap_first_batch(batches: Iterator[Any], stage: int) -> Iterator[Any]:
    """`batches` unchanged; with STEPC_DUMP_FIRST_BATCH set, the first one is saved as it is handed out."""
    prefix = os.environ.get("STEPC_DUMP_FIRST_BATCH", "")
    if not prefix:
        return batches

    def tapped() -> Iterator[Any]:
        import numpy as np

        first = next(batches)
        ids = first[0] if isinstance(first, tuple) else first  # (input_ids, labels): the ids
        np.save(f"{prefix}.stage{stage}.rank{os.environ.get('RANK', '0')}.npy", ids.cpu().numpy())
        yield first
        yield from batches

    return tapped()


def _step_env(name: str) -> int | None:
    value = os.environ.get(name, "").strip()
    return int(value) if value else None


@dataclass(frozen=True)
class Faults:
    """The test-only faults of one stage, read once from the environment: the loop calls these hooks
    at fixed points and never reads the environment itself."""

    stage: int
    oom_at: int | None = None
    nonfinite_at: int | None = None
    optimizer_dump: str = ""

    @classmethod
    def from_env(cls, stage: int) -> Faults:
        return cls(stage, _step_env("STEPC_FAULT_OOM_AT_STEP"), _step_env("STEPC_FAULT_NONFINITE_AT_STEP"),
                   os.environ.get("STEPC_DUMP_OPTIMIZER_AT_START", ""))

    def before_step(self, step: int) -> None:
        if step + 1 == self.oom_at:
            import torch

            raise torch.OutOfMemoryError("CUDA out of memory (STEPC_FAULT_OOM_AT_STEP)")

    def loss(self, done: int, loss: Any) -> Any:
        if done == self.nonfinite_at:
            import torch

            return torch.full_like(loss, float("nan"))
        return loss

    def hold(self, done: int, started_at: int, stop_requested: Callable[[], bool]) -> None:
        hold_after_step(self.stage, done, started_at, stop_requested)

    def batches(self, batches: Iterator[Any]) -> Iterator[Any]:
        return tap_first_batch(batches, self.stage)

    def starting_optimizer(self, model: Any, optimizer: Any, rank: int) -> None:
        if self.optimizer_dump:
            from stepc.runtime.model import carry

            carry.dump_state(model, optimizer, Path(self.optimizer_dump), rank)
