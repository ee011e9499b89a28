"""Which blocks a rank trains on at a step: the held-out split, one source, or a weighted blend.

Samplers are stateless on purpose: the blocks of a micro-batch are a pure function of
``(seed, step, micro, rank, world)``, so resuming from a checkpoint only needs the step, and the
samples of one optimizer step are a contiguous range of global sample numbers, so ranks never
overlap.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

# Second word of the holdout RNG seed. Epoch numbers fill that slot in the sampler, and an epoch
# never gets this large, so the held-out blocks are independent of every epoch's permutation.
_HOLDOUT_STREAM = 0x686F6C64  # "hold"


def global_samples(step: int, micro: int, rank: int, world: int, micro_batch_size: int, grad_accum: int) -> np.ndarray:
    """Global sample numbers of one rank's micro-batch: ``((step * grad_accum + micro) * world + rank)
    * micro_batch_size + k``."""
    if not (0 <= micro < grad_accum and 0 <= rank < world and micro_batch_size > 0 and step >= 0):
        raise ValueError(f"bad batch coordinates step={step} micro={micro}/{grad_accum} "
                         f"rank={rank}/{world} micro_batch_size={micro_batch_size}")
    start = ((step * grad_accum + micro) * world + rank) * micro_batch_size
    return np.arange(start, start + micro_batch_size, dtype=np.int64)


def holdout_split(num_blocks: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic ``(train_idx, val_idx)`` block indices, disjoint, both sorted.

    ``round(fraction * num_blocks)`` blocks (at least 1 when ``fraction > 0``) are held out,
    chosen uniformly from ``seed``; at least one block always stays in training.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"holdout fraction must be in [0, 1), got {fraction}")
    if num_blocks < 1:
        raise ValueError("holdout_split needs at least one block")
    n_val = 0 if fraction == 0 else min(num_blocks - 1, max(1, round(fraction * num_blocks)))
    perm = np.random.default_rng([seed, _HOLDOUT_STREAM]).permutation(num_blocks)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


class BlockSampler:
    """Deterministic, rank-sharded training order over ``blocks`` (optionally a subset).

    Global sample ``g`` lives in epoch ``g // n`` at position ``g % n`` of that epoch's
    permutation ``np.random.default_rng([seed, epoch]).permutation(n)``. A micro-batch takes
    ``g = ((step * grad_accum + micro) * world + rank) * micro_batch_size + k``: the samples of
    one optimizer step form a contiguous range of ``g``, so ranks never overlap, each epoch
    visits every block once, and the data position is a pure function of ``step``.
    """

    def __init__(self, blocks: np.ndarray, seed: int, indices: np.ndarray | None = None) -> None:
        """``indices`` restricts sampling to those blocks (e.g. ``train_idx`` of a holdout)."""
        self.blocks = blocks
        self.seed = int(seed)
        self.indices = np.arange(len(blocks)) if indices is None else np.asarray(indices, np.int64)
        if len(self.indices) == 0:
            raise ValueError("BlockSampler needs at least one block")
        self._perms: dict[int, np.ndarray] = {}

    @property
    def num_samples(self) -> int:
        """Blocks per epoch."""
        return len(self.indices)

    def permutation(self, epoch: int) -> np.ndarray:
        """Order of epoch ``epoch`` (positions into ``indices``); the last two are memoized."""
        if epoch not in self._perms:
            if len(self._perms) >= 2:  # batches only ever straddle two neighbouring epochs
                self._perms.pop(min(self._perms))
            self._perms[epoch] = np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)
        return self._perms[epoch]

    def block_ids(self, step: int, micro: int, rank: int, world: int, micro_batch_size: int,
                  grad_accum: int) -> np.ndarray:
        """Indices into ``blocks`` of one rank's micro-batch (see the class docstring)."""
        g = global_samples(step, micro, rank, world, micro_batch_size, grad_accum)
        epochs, pos = np.divmod(g, self.num_samples)
        out = np.empty(micro_batch_size, dtype=np.int64)
        for epoch in np.unique(epochs):
            sel = epochs == epoch
            out[sel] = self.indices[self.permutation(int(epoch))[pos[sel]]]
        return out

    def batch(self, step: int, micro: int, rank: int, world: int, micro_batch_size: int,
              grad_accum: int) -> np.ndarray:
        """Tokens of one rank's micro-batch: int64 ``(micro_batch_size, seq_len)``."""
        ids = self.block_ids(step, micro, rank, world, micro_batch_size, grad_accum)
        return np.asarray(self.blocks[ids], dtype=np.int64)


class BlendSampler:
    """A deterministic weighted blend of several sources (each a :class:`BlockSampler`'s
    blocks and indices), addressed by step like :class:`BlockSampler`.

    A blend epoch has ``M = sum(n_s)`` samples (``n_s`` blocks in source ``s``), of which
    ``m_s`` (largest-remainder rounding of ``w_s / sum(w) * M``, at least 1) come from source
    ``s``. Global sample ``g`` is position ``perm_E[g % M]`` of blend epoch ``E = g // M``
    (``perm_E = default_rng([seed, E]).permutation(M)``); position ``p`` in source ``s``'s range
    is that source's ``k = E * m_s + (p - offset_s)``-th sample, which is block
    ``default_rng([seed, e, s + 1]).permutation(n_s)[k % n_s]`` of source epoch ``e = k // n_s``.
    So every blend epoch draws exactly ``m_s`` samples from source ``s`` and every source epoch
    visits each of its blocks once, whatever the weights.
    """

    def __init__(self, sources: Sequence[tuple[object, np.ndarray]], weights: Sequence[float], seed: int) -> None:
        """``sources``: ``(blocks, indices)`` per source, in a fixed order; ``weights`` > 0."""
        if len(sources) != len(weights) or not sources or min(weights) <= 0:
            raise ValueError("BlendSampler needs one positive weight per source")
        self.blocks = [blocks for blocks, _ in sources]
        self.indices = [np.asarray(idx, np.int64) for _, idx in sources]
        self.sizes = np.array([len(idx) for idx in self.indices], dtype=np.int64)
        if self.sizes.min() < 1:
            raise ValueError("every source of a blend needs at least one block")
        self.seed = int(seed)
        total = int(self.sizes.sum())
        quota = np.asarray(weights, dtype=np.float64) / float(np.sum(weights)) * total
        counts = np.floor(quota).astype(np.int64)
        for s in np.argsort(-(quota - counts), kind="stable")[: total - int(counts.sum())]:
            counts[s] += 1
        self.counts = np.maximum(counts, 1)
        self.offsets = np.concatenate([[0], np.cumsum(self.counts)]).astype(np.int64)
        self.num_samples = int(self.offsets[-1])
        self._perms: dict[tuple[int, ...], np.ndarray] = {}

    def _perm(self, key: tuple[int, ...], n: int) -> np.ndarray:
        if key not in self._perms:
            if len(self._perms) >= 4 + 2 * len(self.sizes):
                self._perms.pop(next(iter(self._perms)))
            self._perms[key] = np.random.default_rng([self.seed, *key]).permutation(n)
        return self._perms[key]

    def sample_ids(self, step: int, micro: int, rank: int, world: int, micro_batch_size: int,
                   grad_accum: int) -> list[tuple[int, int]]:
        """``(source, block index)`` of each sample of one rank's micro-batch."""
        out = []
        for g in global_samples(step, micro, rank, world, micro_batch_size, grad_accum).tolist():
            epoch, pos = divmod(g, self.num_samples)
            p = int(self._perm((epoch,), self.num_samples)[pos])
            s = int(np.searchsorted(self.offsets, p, side="right")) - 1
            k = epoch * int(self.counts[s]) + p - int(self.offsets[s])
            source_epoch, q = divmod(k, int(self.sizes[s]))
            out.append((s, int(self.indices[s][self._perm((source_epoch, s + 1), int(self.sizes[s]))[q]])))
        return out

    def batch(self, step: int, micro: int, rank: int, world: int, micro_batch_size: int,
              grad_accum: int) -> np.ndarray:
        """Tokens of one rank's micro-batch: int64 ``(micro_batch_size, seq_len)``."""
        rows = [np.asarray(self.blocks[s][np.array([b])], dtype=np.int64)[0]
                for s, b in self.sample_ids(step, micro, rank, world, micro_batch_size, grad_accum)]
        return np.stack(rows)
