"""The training processes' view of prepared data: open the shards `stepc data prepare` wrote,
check they still describe the spec's files, and build samplers, eval sets and the fingerprint.

Nothing here tokenises: a missing or stale preparation is an error that names the command to
run. Opening costs a glob, a stat per data file and shard, and a few small JSON reads; a file
whose size or mtime changed since preparation is re-hashed and must match the recorded sha256.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from stepc.errors import UserError
from stepc.hashing import file_sha256_hex
from stepc.runtime.data.documents import expand_patterns
from stepc.runtime.data.sampler import BlendSampler, BlockSampler, holdout_split
from stepc.runtime.data.index import (BlendFingerprint, DataFingerprint, DataIndex, DatasetFingerprint, FileEntry, FileId,
                                     read_index)
from stepc.runtime.data.shards import SHARD_FORMAT, Shard, TokenBlocks, shards_sha256
from stepc.runtime.data.tokenizer import tokenizer_hash
from stepc.schema.spec import Data


@dataclass
class PreparedData:
    tokenizer: Tokenizer
    train: dict[str, TokenBlocks]  # source name -> blocks ("train" for the single-source form)
    validation: dict[str, TokenBlocks]
    fingerprint: DataFingerprint


def _stale(run_dir: Path, why: str) -> UserError:
    return UserError(f"the prepared data is missing or stale: {why}", file=str(run_dir),
                     fix=f"run `stepc data prepare {run_dir}` (the stage scripts and `stepc run` do) from the "
                         "directory the spec's data paths are relative to")


def dataset_key(data: Data, kind: str, name: str) -> str:
    """The TOML key a dataset comes from (for errors)."""
    if kind == "validation":
        return f"data.validation.{name}"
    return f"data.sources.{name}.files" if data.sources else "data.train"


def current_index(run_dir: Path, data: Data) -> DataIndex:
    """The run's data index if it still describes ``data`` and the files on disk: same settings,
    same files matching each pattern, each file's size and mtime as recorded (or, when those
    changed, the same sha256), every shard present at its recorded size. Otherwise a UserError
    naming `stepc data prepare`. Costs a glob and a stat per file and shard."""
    index = read_index(run_dir)
    if index is None:
        raise _stale(run_dir, "no data-index.json")
    expected = {"format": SHARD_FORMAT, "tokenizer": data.tokenizer, "text_field": data.text_field,
                "cache_dir": data.cache_dir,
                "train": {n: list(s.files) for n, s in data.training_sources().items()},
                "validation": {n: [p] for n, p in data.validation.items()}}
    recorded = {"format": index.format, "tokenizer": index.tokenizer.name, "text_field": index.text_field,
                "cache_dir": index.cache_dir,
                "train": {n: d.patterns for n, d in index.train.items()},
                "validation": {n: d.patterns for n, d in index.validation.items()}}
    if recorded != expected:
        raise _stale(run_dir, "data-index.json was prepared for other [data] settings")
    cache = Path(data.cache_dir)
    for kind, by_name in index.datasets().items():
        for name, entry in by_name.items():
            key = dataset_key(data, kind, name)
            now = [p.as_posix() for p in expand_patterns(entry.patterns, key)]
            if now != [f.path for f in entry.files]:
                raise _stale(run_dir, f"the files matching [{key}] changed since preparation")
            for f in entry.files:
                _check_unchanged(run_dir, f)
                for s in f.shards:
                    path = cache / s.path
                    try:
                        size = path.stat().st_size
                    except OSError:
                        size = -1
                    if size != s.tokens * index.itemsize:
                        raise _stale(run_dir, f"shard {path} is missing or truncated")
    return index


def open_prepared(run_dir: Path, data: Data, seq_len: int) -> PreparedData:
    """The run's prepared datasets as memory-mapped blocks of ``seq_len`` tokens."""
    index = current_index(run_dir, data)
    cache = Path(data.cache_dir)
    tok_path = cache / index.tokenizer.file
    try:
        tok = Tokenizer.from_file(str(tok_path))
    except Exception:
        raise _stale(run_dir, f"cannot load the tokenizer {tok_path}") from None
    if tokenizer_hash(tok) != index.tokenizer.sha256:
        raise _stale(run_dir, f"{tok_path} does not match its recorded sha256")

    def blocks(kind: str, name: str) -> tuple[TokenBlocks, DatasetFingerprint]:
        entry = index.datasets()[kind][name]
        shards = [Shard(cache / s.path, s.tokens, s.sha256) for f in entry.files for s in f.shards]
        tb = TokenBlocks(shards, np.dtype(index.dtype), seq_len)
        if tb.num_blocks < 1:
            raise UserError(f"data too small: {tb.num_tokens} tokens, fewer than one block of seq_len={seq_len}",
                            file=entry.patterns[0], key=dataset_key(data, kind, name), fix="add data or lower model.seq_len")
        weights: dict[str, Any] = {}
        if kind == "train" and data.sources:
            source = data.training_sources()[name]  # every stage's weight: stages share one fingerprint
            weights = {"weight": source.weight, "stage_weights": list(source.stage_weights) if source.stage_weights else None}
        return tb, DatasetFingerprint.seal(
            format=SHARD_FORMAT, files=[FileId(path=f.path, size=f.size, sha256=f.sha256) for f in entry.files],
            tokenizer=index.tokenizer.sha256, seq_len=seq_len, text_field=data.text_field, num_blocks=tb.num_blocks,
            num_tokens=tb.num_tokens, shards_sha256=shards_sha256(shards), **weights)

    train: dict[str, TokenBlocks] = {}
    train_fp: dict[str, DatasetFingerprint] = {}
    for name in index.train:
        train[name], train_fp[name] = blocks("train", name)
    validation: dict[str, TokenBlocks] = {}
    datasets: dict[str, DatasetFingerprint | BlendFingerprint] = {}
    for name in sorted(index.validation):
        validation[name], datasets[name] = blocks("validation", name)
    datasets["train"] = BlendFingerprint.seal(sources=train_fp) if data.sources else train_fp["train"]
    fingerprint = DataFingerprint(datasets)
    return PreparedData(tok, train, validation, fingerprint)


def _check_unchanged(run_dir: Path, entry: FileEntry) -> None:
    path = Path(entry.path)
    try:
        st = path.stat()
    except OSError:
        raise _stale(run_dir, f"{path} is gone") from None
    if (st.st_size, st.st_mtime_ns) != (entry.size, entry.mtime_ns) and (
            st.st_size != entry.size or file_sha256_hex(path) != entry.sha256):
        raise _stale(run_dir, f"{path} changed since preparation")


def training_sets(prepared: PreparedData, holdout_fraction: float, seed: int, weights: dict[str, float] | None = None
                  ) -> tuple[BlockSampler | BlendSampler, dict[str, tuple[Any, np.ndarray | None]]]:
    """The training sampler and ``{name: (blocks, indices)}`` eval sets: each source's held-out
    split ("heldout", or "heldout-<source>" for a blend) plus the named validation sets. One
    definition for the runtime's evaluations and `stepc eval`, so both score the same blocks.
    ``weights`` (a blend's, for the stage being trained; :meth:`Data.weights_at`) default to 1."""
    sources, sets = [], {}
    blend = len(prepared.train) > 1 or next(iter(prepared.train)) != "train"
    names = sorted(prepared.train)  # sources in name order: the blend never depends on TOML key order
    for name in names:
        blocks = prepared.train[name]
        train_idx, heldout_idx = holdout_split(len(blocks), holdout_fraction, seed)
        sources.append((blocks, train_idx))
        if len(heldout_idx):
            sets["heldout" if not blend else f"heldout-{name}"] = (blocks, heldout_idx)
    sets.update({name: (blocks, None) for name, blocks in prepared.validation.items()})
    if not blend:
        blocks, train_idx = sources[0]
        return BlockSampler(blocks, seed, indices=train_idx), sets
    return BlendSampler(sources, [(weights or {}).get(n, 1.0) for n in names], seed), sets

