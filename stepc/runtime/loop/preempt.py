"""Stop at a step boundary when the job is told to stop: lose at most the optimizer step in flight.

SIGTERM (scancel, preemption, `kill`), SIGINT (Ctrl-C) and SIGUSR1 (SLURM's time-limit warning) only set
a flag here (as does the stage script's STOP_REQUEST file, for a signal that came too early). At the end
of every optimizer step all ranks agree on it with one tiny all_reduce (MAX of the flag), so every rank
stops after the same step even when the signal reached them a step apart; the loop then writes a
checkpoint at that step, `record_stop` writes STOPPED (RunDir.stop_record) in the stage's checkpoint
directory, and the worker exits 0.

Why a marker file and not an exit code: torchrun turns any worker's exit code into 1, and a rank
killed mid-collective gives 1 as well. The stage script removes STOPPED before torchrun starts and
reads it after torchrun ends; when it is there the stage exits with `EXIT_STOPPED` (75, EX_TEMPFAIL:
"try again later"), which run.sbatch turns into a requeue (USR1) or a clean stop (TERM) and
`stepc run` into "stopped at step N; rerun to resume".

Signals reach the workers from the stage script (it forwards them to torchrun's children) or, under
SLURM, from slurmstepd (it signals every process of the step); torchrun itself ignores them (see
stage.sh), so its 30 s shutdown timeout never cuts a checkpoint short. A second signal more than
`ESCALATE_AFTER_S` seconds after the first (a user pressing Ctrl-C again because a collective hangs)
restores the default action and re-raises it: the worker dies at once.

Hand-written because no library does this: torch.distributed.elastic has no step-boundary stop.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

from stepc.atomic import atomic_write_text

EXIT_STOPPED = 75
SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
ESCALATE_AFTER_S = 5.0

_received: dict[str, float | str | None] = {"name": None, "at": None}
_steps_done = 0  # steps finished when the signal arrived (for the STOPPED record)
_signal_steps_done: int | None = None


def _handler(signum: int, frame) -> None:
    global _signal_steps_done
    now = time.monotonic()
    if _received["at"] is not None and now - float(_received["at"]) > ESCALATE_AFTER_S:
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return
    if _received["name"] is None:
        _received["name"], _received["at"] = signal.Signals(signum).name, now
        _signal_steps_done = _steps_done


def install() -> None:
    """Catch the stop signals (call before the heavy imports, so an early signal is not lost)."""
    for sig in SIGNALS:
        signal.signal(sig, _handler)


def requested() -> str | None:
    """The name of the first stop signal this process received, or None."""
    return _received["name"]  # type: ignore[return-value]


def agreed_stop(steps_done: int, request_file: Path | None = None) -> bool:
    """Collective, once per optimizer step on every rank: has ANY rank been told to stop?

    `request_file` (rank 0 only: one stat per step): the stage script's STOP_REQUEST, written when
    it is signalled. It covers a signal that reached the workers before `install` ran.

    The flag is a CPU tensor, reduced by gloo (on a GPU the group is "cpu:gloo,cuda:nccl"): reading it
    back waits for no GPU kernel, so the step loop keeps its one host sync per log interval."""
    import torch
    import torch.distributed as dist

    global _steps_done, _signal_steps_done
    _steps_done = steps_done
    if not requested() and request_file is not None and request_file.exists():
        try:
            name = request_file.read_text().strip() or "SIGTERM"
        except OSError:
            name = "SIGTERM"
        _received["name"], _received["at"] = name, time.monotonic()
        _signal_steps_done = steps_done - 1  # noticed at this step's end: the signal came during it (or earlier)
    flag = torch.tensor([1 if requested() else 0], dtype=torch.int32)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def record_stop(path: Path, step: int, checkpoint: Path) -> dict:
    """Rank 0, after the checkpoint at `step` is complete: the STOPPED record the stage script reads."""
    record = {"step": step, "signal": requested() or "peer", "steps_done_at_signal": _signal_steps_done,
              "checkpoint": str(checkpoint)}
    # one line, "step" before "signal": stage.sh reads it with sed
    atomic_write_text(path, json.dumps(record) + "\n")
    return record
