"""Micro-batches on the device, one ahead of the step that uses them.

On a GPU each batch is copied from pinned host memory with non_blocking=True, and the copy of the
next micro-batch is issued before the current one is handed out, so it overlaps the current forward
and backward instead of stalling the stream. (The caching host allocator keeps a pinned block alive
until its copy has finished, so the host tensor may go out of scope right away.) On the CPU it is a
plain generator.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import torch


def device_batches(make: Callable[[int, int], np.ndarray], steps: range, accum: int,
                   device: torch.device) -> Iterator[torch.Tensor]:
    """The `accum` micro-batches of every step in `steps`, in order; make(step, micro) -> token ids."""
    pin = device.type == "cuda"

    def load(step: int, micro: int) -> torch.Tensor:
        host = torch.from_numpy(make(step, micro))
        if pin:
            host = host.pin_memory()
        return host.to(device, non_blocking=pin)

    pending = None
    for step in steps:
        for micro in range(accum):
            ahead = load(step, micro)
            if pending is not None:
                yield pending
            pending = ahead
    if pending is not None:
        yield pending
