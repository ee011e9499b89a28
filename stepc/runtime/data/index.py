"""The typed records of prepared data: a run's ``data-index.json`` and, in the shard cache, each
file's ``index.json`` and each unit's metadata (layout in shards.py).

`stepc data prepare` writes them, the training processes, `stepc eval` and the stage preflight read
them; pydantic validates on read, so a damaged or foreign record reads as "not prepared" (and is
prepared again) instead of failing later on a missing key.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TypeVar

import numpy as np
from pydantic import BaseModel, ConfigDict, ValidationError

from stepc.atomic import atomic_write_json
from stepc.rundir import RunDir


class _Record(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class UnitMeta(_Record):
    """One tokenised unit (``<i>.json`` beside its ``<i>.bin``): written after the shard, so it vouches for it."""
    format: int
    start: int  # the unit's first row (parquet) or byte (text) in its file
    stop: int
    tokens: int  # ids in the shard, EOS included
    documents: int  # documents that end in this unit
    sha256: str  # of the shard's bytes, computed while writing it


class CachedUnit(UnitMeta):
    shard: str  # the .bin's name inside the file's cache directory


class FileShards(_Record):
    """A completely prepared data file in the shard cache (its directory's ``index.json``, written last)."""
    format: int
    file_sha256: str
    tokenizer: str  # sha256 of the tokenizer it was tokenised with
    dtype: str
    units: list[CachedUnit]
    documents: int
    tokens: int


class ShardRef(_Record):
    path: str  # relative to the cache directory
    tokens: int
    sha256: str


class FileEntry(_Record):
    path: str  # as the pattern gave it (posix)
    size: int
    mtime_ns: int
    sha256: str
    shards: list[ShardRef]
    documents: int
    tokens: int


class Dataset(_Record):
    patterns: list[str]  # the spec's globs, as written
    files: list[FileEntry]  # in the order their shards are concatenated
    tokens: int
    documents: int


class TokenizerRef(_Record):
    name: str  # the spec's data.tokenizer
    sha256: str
    file: str  # the saved tokenizer, relative to the cache directory


class DataIndex(_Record):
    """``RUN_DIR/data-index.json``: per dataset, its files and their shards in stream order."""
    format: int
    tokenizer: TokenizerRef
    cache_dir: str
    dtype: str  # the shards' numpy dtype (uint16, or uint32 for vocabularies above 65536)
    eos: int
    text_field: str
    train: dict[str, Dataset]  # source name ("train" for the single-source form)
    validation: dict[str, Dataset]

    @property
    def itemsize(self) -> int:
        return np.dtype(self.dtype).itemsize

    def datasets(self) -> dict[str, dict[str, Dataset]]:
        return {"train": self.train, "validation": self.validation}

    def write(self, run_dir: Path) -> None:
        atomic_write_json(RunDir(run_dir).data_index, self.model_dump())


R = TypeVar("R", bound=_Record)


def read_json_record(path: Path, model: type[R]) -> R | None:
    """``model`` read from ``path``, or None when it is missing, unreadable or not that record."""
    try:
        return model.model_validate(json.loads(path.read_bytes()))
    except (OSError, ValueError, ValidationError):
        return None


def read_index(run_dir: Path) -> DataIndex | None:
    """The run's data index, or None when `stepc data prepare` has not written (a valid) one."""
    return read_json_record(RunDir(run_dir).data_index, DataIndex)
