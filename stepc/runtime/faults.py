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

Unset (always, outside tests), every call is a no-op.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path


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
