"""The live console of a training stage (rank 0 only).

On a terminal: one tqdm bar per stage, redrawn in place, with step, loss, lr, tokens/s, MFU (where
the GPU's peak is known), the process peak ("proc peak": CUDA max allocated on a GPU, peak RSS on a
CPU, in format_bytes' GB) and the ETA of the stage and of the whole run. Anywhere else
(SLURM logs, pipes, files): one plain line per update and never a carriage return, so log files
stay greppable. Messages (evals, resumes, exports) go above the bar without breaking it.

ETAs come from the plan, not from tqdm's smoothed rate: the stage's remaining steps at the
measured seconds per step, and the run's remaining FLOPs (the rest of this stage plus every later
stage, from the plan's FLOPs schedule) at the measured FLOP rate, because later stages train more
layers per step than this one.
"""

from __future__ import annotations

import os
import sys
from datetime import timedelta
from typing import Any, Sequence, TextIO

from stepc.schema.units import format_bytes

_active: "Console | None" = None  # the bar messages must be written around


def echo(message: str) -> None:
    """Print a message (rank 0 decides whether to call this) without tearing the progress bar."""
    if _active is not None and _active.bar is not None:
        _active.bar.write(message, file=_active.stream)
        _active.stream.flush()
    else:
        print(message, flush=True)


def _duration(seconds: float) -> str:
    return str(timedelta(seconds=round(max(0.0, seconds))))


def quiet_library_bars_unless_tty() -> None:
    """Before the model is loaded: the libraries' own progress bars ("Loading weights", "Writing model
    shards") are carriage-return redraws, so they stay off unless both stdout and stderr are terminals."""
    if not (sys.stdout.isatty() and sys.stderr.isatty()):
        _quiet_library_bars()


def _quiet_library_bars() -> None:
    """The libraries' own progress bars off (transformers', huggingface_hub's)."""
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:
        pass


def _bar_class():
    """tqdm with a `{fields}` key for bar_format (tqdm's own {postfix} comes with a leading comma)."""
    from tqdm import tqdm

    class Bar(tqdm):
        fields = ""

        @property
        def format_dict(self):
            return {**super().format_dict, "fields": self.fields}

    return Bar


class Console:
    """Progress of stage `index` of a run whose plan stages are `stages` (the typed plan's StagePlans)."""

    def __init__(self, index: int, stages: Sequence[Any], start: int, tokens_per_step: int,
                 enabled: bool = True, stream: TextIO | None = None) -> None:
        global _active
        self.index, self.stages, self.tokens_per_step = index, stages, tokens_per_step
        self.info = stages[index - 1]  # StagePlan-like: .steps, .flops, .tokens
        self.stream = stream or sys.stdout
        self.enabled = enabled
        self.bar = None
        if not enabled:
            return
        if not self.stream.isatty():
            _quiet_library_bars()
        else:
            self.bar = _bar_class()(total=self.info.steps, initial=start, file=self.stream, dynamic_ncols=True,
                                    unit="step", desc=f"stage {index}/{len(stages)}", mininterval=0,
                                    bar_format="{desc} {n_fmt}/{total_fmt} |{bar}| {fields}")
        _active = self

    def fields(self, done: int, loss: float, lr: float, tokens_per_s: float, mfu: float | None,
               memory_bytes: int | None) -> list[str]:
        """The numbers of one update, in display order."""
        steps = self.info.steps
        seconds_per_step = self.tokens_per_step / max(tokens_per_s, 1e-9)
        flops_per_s = tokens_per_s * self.info.flops / max(1, self.info.tokens)
        remaining_flops = self.info.flops * (steps - done) / max(1, steps)
        remaining_flops += sum(s.flops for s in self.stages[self.index:])
        out = [f"loss {loss:.4f}", f"lr {lr:.2e}", f"{tokens_per_s:,.0f} tok/s"]
        if mfu is not None:
            out.append(f"MFU {100 * mfu:.1f}%")
        out += [f"proc peak {'-' if memory_bytes is None else format_bytes(memory_bytes)}", f"eta stage {_duration((steps - done) * seconds_per_step)}",
                f"run {_duration(remaining_flops / max(flops_per_s, 1e-9))}"]
        return out

    def update(self, done: int, loss: float, lr: float, tokens_per_s: float, mfu: float | None = None,
               memory_bytes: int | None = None) -> None:
        if not self.enabled:
            return
        fields = self.fields(done, loss, lr, tokens_per_s, mfu, memory_bytes)
        if self.bar is not None:
            self.bar.fields = " ".join(fields)
            self.bar.update(done - self.bar.n)
        else:
            print(f"stage {self.index}/{len(self.stages)} step {done}/{self.info.steps} " + " ".join(fields),
                  file=self.stream, flush=True)

    def close(self) -> None:
        global _active
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if _active is self:
            _active = None
