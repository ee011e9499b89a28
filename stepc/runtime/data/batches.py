"""Micro-batches (input_ids, labels) on the device, one ahead of the step that uses them.

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


def device_batches(make: Callable[[int, int], np.ndarray | tuple[np.ndarray, np.ndarray]], steps: range, accum: int,
                   device: torch.device) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The `accum` (input_ids, labels) micro-batches of every step in `steps`, in order. make(step, micro)
    returns token ids (language modelling: the labels are the ids themselves, copied once) or a pair
    (instruction tuning: labels with IGNORE_INDEX where no loss is taken)."""
    pin = device.type == "cuda"

    def move(array: np.ndarray) -> torch.Tensor:
        host = torch.from_numpy(array)
        if pin:
            host = host.pin_memory()
        return host.to(device, non_blocking=pin)

    def load(step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
        made = make(step, micro)
        if isinstance(made, tuple):
            return move(made[0]), move(made[1])
        ids = move(made)
        return ids, ids

    pending = None
    for step in steps:
        for micro in range(accum):
            ahead = load(step, micro)
            if pending is not None:
                yield pending
            pending = ahead
    if pending is not None:
        yield pending
