"""Token shards: the on-disk format written by `stepc data prepare`, and the memory-mapped
``seq_len`` blocks training reads from them.

Cache layout (``[data] cache_dir``, shared by every run that uses the same files and tokenizer)::

    tokenizers/<sha256>.json                     every tokenizer a preparation used, by content
    hashes/<key>.json                            sha256 of a file, keyed by (path, size, mtime, inode)
    shards/<tokenizer sha[:16]>/<file key>/      one directory per (file content, tokenizer, field)
        00000.bin, 00000.json, ...               one flat token shard per unit (+ its metadata)
        index.json                               written last: the file is completely prepared

A run's ``data-index.json`` (beside manifest.json) lists, per dataset, its files (path as
given, size, mtime, sha256) and their shards in order. A dataset's token stream is the
concatenation of its shards in that order, exactly the documents of stepc 0.1's packing, each
followed by EOS; block ``b`` is tokens ``[b * seq_len, (b + 1) * seq_len)`` and the tail is
dropped. Shards hold uint16 ids when the vocabulary fits, else uint32.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from stepc.hashing import canonical_json

SHARD_FORMAT = 2  # stepc 0.1's int32 .npy block cache was format 1


def token_dtype(id_bound: int) -> np.dtype:
    """uint16 when every id (all below ``id_bound``, see tokenizer.id_bound) fits (GPT-2's 50257 do), else uint32."""
    return np.dtype(np.uint16) if id_bound <= 1 << 16 else np.dtype(np.uint32)


@dataclass(frozen=True)
class Shard:
    path: Path
    tokens: int
    sha256: str


class TokenBlocks:
    """``seq_len`` blocks over the concatenation of shards, read through ``np.memmap``.

    Behaves like the int array of shape ``(num_blocks, seq_len)`` that stepc 0.1 kept in
    memory: ``len()``, ``.shape`` and indexing by an integer array (which returns int64 rows).
    Shards are opened lazily, so ranks share the page cache and opening costs nothing.
    """

    def __init__(self, shards: Sequence[Shard], dtype: np.dtype, seq_len: int) -> None:
        self.shards = [s for s in shards if s.tokens > 0]  # np.memmap cannot map an empty file
        self.dtype = np.dtype(dtype)
        self.seq_len = int(seq_len)
        sizes = np.array([s.tokens for s in self.shards], dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self.num_tokens = int(self.starts[-1])
        self.num_blocks = self.num_tokens // self.seq_len
        self._maps: dict[int, np.ndarray] = {}

    @property
    def shape(self) -> tuple[int, int]:
        return (self.num_blocks, self.seq_len)

    def __len__(self) -> int:
        return self.num_blocks

    def _map(self, i: int) -> np.ndarray:
        if i not in self._maps:
            self._maps[i] = np.memmap(self.shards[i].path, dtype=self.dtype, mode="r", shape=(self.shards[i].tokens,))
        return self._maps[i]

    def tokens(self, start: int, stop: int) -> np.ndarray:
        """Tokens ``[start, stop)`` of the concatenated stream, as int64."""
        out = np.empty(stop - start, dtype=np.int64)
        pos = start
        shard = int(np.searchsorted(self.starts, start, side="right")) - 1
        while pos < stop:
            offset = pos - int(self.starts[shard])
            take = min(stop - pos, self.shards[shard].tokens - offset)
            out[pos - start:pos - start + take] = self._map(shard)[offset:offset + take]
            pos += take
            shard += 1
        return out

    def __getitem__(self, ids: Any) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64)
        if ids.ndim == 0:
            return self[ids[None]][0]
        if len(ids) and (ids.min() < 0 or ids.max() >= self.num_blocks):
            raise IndexError(f"block index out of range [0, {self.num_blocks})")
        out = np.empty((len(ids), self.seq_len), dtype=np.int64)
        for row, block in enumerate(ids.tolist()):
            out[row] = self.tokens(block * self.seq_len, (block + 1) * self.seq_len)
        return out

    def block_array(self) -> np.ndarray:
        """All blocks as one int32 array (stepc 0.1's cache layout; for tests and small data)."""
        return self.tokens(0, self.num_blocks * self.seq_len).astype(np.int32).reshape(self.shape)


def shards_sha256(shards: Sequence[Shard]) -> str:
    """One hash of the ordered per-shard sha256s (each computed while the shard was written)."""
    return hashlib.sha256(canonical_json([s.sha256 for s in shards]).encode()).hexdigest()
