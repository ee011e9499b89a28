"""The live console of a training stage (rank 0 only).

On a terminal: one tqdm bar per stage, redrawn in place, with step, the ETA of the stage and of the
whole run, loss, lr, tokens/s, MFU (where the GPU's peak is known) and the process peak ("proc peak":
CUDA max allocated on a GPU, peak RSS on a CPU, in format_bytes' GB), in that order of importance:
a narrow terminal (80 columns) drops fields from the end, never the ETA. Anywhere else (SLURM logs,
pipes, files): one plain line per update with every field and never a carriage return, so log files
stay greppable. Messages (evals, resumes, exports) go above the bar without breaking it.

The ETAs are RunEta's (eta.py): measured step time, start-up, warm-up, evaluations, checkpoints
and the stage's wind-down, not tqdm's smoothed rate.
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


MIN_BAR = 10  # columns the bar keeps on a narrow terminal; fields beyond the width are dropped instead


def fit(head: str, fields: Sequence[str], width: int) -> str:
    """The bar's text after `head` ("stage 1/2 10/20"): the leading fields that fit in `width` columns
    with a bar of at least MIN_BAR columns (tqdm's format "{head} |{bar}| {fields}"); one column is
    left free, since a full-width line wraps on some terminals."""
    room = width - 1 - len(head) - len(" ||  ") - MIN_BAR
    shown: list[str] = []
    for field in fields:
        if len(" ".join([*shown, field])) > room:
            break
        shown.append(field)
    return " ".join(shown)


def _terminal_width(stream: TextIO) -> int:
    try:
        return os.get_terminal_size(stream.fileno()).columns
    except (OSError, ValueError, AttributeError):
        return 80


class Console:
    """Progress of stage `index` of a run whose plan stages are `stages` (the typed plan's StagePlans);
    `eta` (a RunEta fed every record this stage writes) gives the ETAs."""

    def __init__(self, index: int, stages: Sequence[Any], start: int, enabled: bool = True,
                 stream: TextIO | None = None, eta: Any = None) -> None:
        global _active
        self.index, self.stages, self.eta = index, stages, eta
        self.info = stages[index - 1]  # StagePlan-like: .steps
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
        """The numbers of one update, most important first (a narrow terminal drops from the end)."""
        remaining = self.eta.remaining(self.index, done) if self.eta is not None else None
        if remaining is None:
            out = ["eta stage - run -"]
        else:
            out = [f"eta stage {_duration(remaining[0])} run {_duration(remaining[1])}"]
        out += [f"loss {loss:.4f}", f"{tokens_per_s:,.0f} tok/s", f"lr {lr:.2e}"]
        if mfu is not None:
            out.append(f"MFU {100 * mfu:.1f}%")
        out.append(f"proc peak {'-' if memory_bytes is None else format_bytes(memory_bytes)}")
        return out

    def update(self, done: int, loss: float, lr: float, tokens_per_s: float, mfu: float | None = None,
               memory_bytes: int | None = None) -> None:
        if not self.enabled:
            return
        fields = self.fields(done, loss, lr, tokens_per_s, mfu, memory_bytes)
        if self.bar is not None:
            head = f"stage {self.index}/{len(self.stages)} {done}/{self.info.steps}"
            self.bar.fields = fit(head, fields, _terminal_width(self.stream))
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
