"""Fault injection for the tests: deterministic points where a stage can be stopped from outside.

STEPC_FAULT_PAUSE_AT=<point> with STEPC_FAULT_PAUSE_FILE=<path>: when a rank reaches `point`
(e.g. "growth": the grown model's shards just filled from stage i-1's export, before the optimizer
exists), it writes <path>.rank<RANK> and
sleeps until killed, so a test can kill -9 the stage exactly there rather than racing a metric
written later. Unset (always, outside tests), every call is a no-op.
"""

from __future__ import annotations

import os
import time
from pathlib import Path


def pause_point(name: str) -> None:
    if os.environ.get("STEPC_FAULT_PAUSE_AT", "") != name:
        return
    marker = Path(os.environ["STEPC_FAULT_PAUSE_FILE"] + f".rank{os.environ.get('RANK', '0')}")
    marker.write_text(f"paused at {name}\n")
    while True:  # until the test kills the stage
        time.sleep(1)
