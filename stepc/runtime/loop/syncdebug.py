"""STEPC_SYNC_DEBUG=warn|error: check the claim that a training step never waits for the GPU.

The loop reads the loss back only at log, eval and checkpoint steps (train.py). Any other host sync
inside a step (a `.item()`, a data-dependent shape, a pageable copy) stalls the CPU until the GPU
drains, so the next kernels are queued late. torch's own sync debugger
(`torch.cuda.set_sync_debug_mode`) finds them; as in OLMo-core, the runtime switches it on around
the optimizer step only, so the deliberate syncs between steps are not counted:

* ``warn``: every synchronising call inside a step is counted; each log record carries
  ``host_syncs`` (calls since the last record) and the first call sites are printed once.
* ``error``: the first synchronising call raises, with its traceback.

Unset, or on a CPU, it does nothing (`bench/gpu.py` sets it; users need not).
"""

from __future__ import annotations

import os
import warnings
from collections import Counter
from contextlib import contextmanager

import torch

MODES = ("warn", "error")
MESSAGE = "called a synchronizing CUDA operation"


class SyncCheck:
    def __init__(self, device: torch.device) -> None:
        mode = os.environ.get("STEPC_SYNC_DEBUG", "").strip()
        if mode and mode not in MODES:
            raise ValueError(f"STEPC_SYNC_DEBUG={mode!r}: expected one of {', '.join(MODES)} (or unset)")
        self.mode = mode if device.type == "cuda" else ""
        self.count = 0  # since the last take()
        self.sites: Counter[str] = Counter()

    @property
    def active(self) -> bool:
        return bool(self.mode)

    @contextmanager
    def step(self):
        if not self.mode:
            yield
            return
        torch.cuda.set_sync_debug_mode(self.mode)
        try:
            if self.mode == "error":
                yield
                return
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                yield
            for w in caught:
                if MESSAGE in str(w.message):
                    self.count += 1
                    self.sites[f"{w.filename}:{w.lineno}"] += 1
                else:  # not ours: let it through as it would have been
                    warnings.showwarning(w.message, w.category, w.filename, w.lineno)
        finally:
            torch.cuda.set_sync_debug_mode(0)

    def take(self) -> int | None:
        """The syncs counted since the last call (None when not checking)."""
        if not self.mode:
            return None
        count, self.count = self.count, 0
        return count
