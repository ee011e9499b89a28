"""Evaluation batches: the same blocks, in the same order, for the runtime and `stepc eval`."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np


def iter_eval_batches(blocks: np.ndarray, batch_size: int, rank: int, world: int,
                      max_tokens: int | None = None,
                      indices: np.ndarray | None = None) -> Iterator[np.ndarray]:
    """Deterministic evaluation batches for one rank: int64 ``(<= batch_size, seq_len)``.

    Uses the first ``max_tokens // seq_len`` blocks (all when ``max_tokens`` is None or <= 0) of
    ``indices`` (default: all blocks), trimmed to a multiple of ``world`` and dealt round-robin.
    Every rank therefore yields the same number of batches of the same sizes, which FSDP needs
    (a rank that skips a forward pass would hang the others' collectives).
    """
    seq_len = blocks.shape[1]
    order = np.arange(len(blocks)) if indices is None else np.asarray(indices, np.int64)
    if max_tokens is not None and max_tokens > 0:
        order = order[: max(1, max_tokens // seq_len)]
    order = order[: (len(order) // world) * world]
    mine = order[rank::world]
    for start in range(0, len(mine), batch_size):
        yield np.asarray(blocks[mine[start:start + batch_size]], dtype=np.int64)
