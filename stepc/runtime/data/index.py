"""The typed records of prepared data: a run's ``data-index.json`` and, in the shard cache, each
file's ``index.json`` and each unit's metadata (layout in shards.py); and the run's
``data-fingerprint.json``, what its first stage read.

`stepc data prepare` writes them, the training processes, `stepc eval` and the stage preflight read
them; pydantic validates on read, so a damaged or foreign record reads as "not prepared" (and is
prepared again) instead of failing later on a missing key.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from pydantic import BaseModel, ConfigDict, RootModel, ValidationError

from stepc.atomic import atomic_write_json
from stepc.hashing import canonical_json
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


# ------------------------------------------------------------------------------ fingerprint

class FileId(_Record):
    path: str
    size: int
    sha256: str


class _Sealed(_Record):
    """A record whose ``sha256`` is the digest of its other fields (canonical JSON, unset fields left out)."""
    sha256: str

    @classmethod
    def seal(cls, **body: Any):
        unsealed = cls.model_construct(**body, sha256="").model_dump(exclude_none=True, exclude={"sha256"})
        return cls(**body, sha256=hashlib.sha256(canonical_json(unsealed).encode()).hexdigest())


class DatasetFingerprint(_Sealed):
    """What one dataset's token stream is: its files, the tokenizer, and the blocks it is cut into."""
    format: int
    files: list[FileId]
    tokenizer: str  # sha256
    seq_len: int
    text_field: str
    num_blocks: int
    num_tokens: int
    shards_sha256: str  # of the shards' own sha256s, in stream order
    weight: float | None = None  # a blend's source: every stage's weight (stages share one fingerprint)
    stage_weights: list[float] | None = None


class BlendFingerprint(_Sealed):
    sources: dict[str, DatasetFingerprint]


class InstructionsFingerprint(_Sealed):
    """An SFT run's tokenised examples (RUN_DIR/instructions)."""
    key: dict[str, Any]  # everything the arrays depend on (instructions._key)
    arrays: dict[str, dict[str, Any]]  # name -> bytes, sha256


class DataFingerprint(RootModel[dict[str, DatasetFingerprint | BlendFingerprint | InstructionsFingerprint]]):
    """``RUN_DIR/data-fingerprint.json``: what the first stage read, per dataset ("train", each
    validation set, or "instructions"); later stages and resumes must read the same."""
    model_config = ConfigDict(frozen=True)

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(exclude_none=True)

    def files(self) -> dict[str, list[FileId]]:
        """``{dataset label: files}`` (a blend's sources as ``train.<name>``): what the preflight compares."""
        out: dict[str, list[FileId]] = {}
        for name, fp in self.root.items():
            if isinstance(fp, BlendFingerprint):
                out.update({f"{name}.{src}": s.files for src, s in fp.sources.items()})
            elif isinstance(fp, DatasetFingerprint):
                out[name] = fp.files
        return out

    def changes(self, now: DataFingerprint) -> list[str]:
        """Each dataset that differs, with the fields that do ("train (seq_len, num_blocks)")."""
        before_all, now_all = self.to_json(), now.to_json()
        changed = []
        for name in sorted(set(before_all) | set(now_all)):
            before, after = before_all.get(name), now_all.get(name)
            if before is None or after is None:
                changed.append(f"{name} ({'new' if after else 'gone'})")
            elif before != after:
                keys = sorted(k for k in set(before) | set(after) if k != "sha256" and before.get(k) != after.get(k))
                changed.append(f"{name} ({', '.join(keys)})")
        return changed


def read_fingerprint(path: Path) -> DataFingerprint:
    """The recorded fingerprint; ValueError (with the reason) when it cannot be read as one."""
    return DataFingerprint.model_validate(json.loads(path.read_bytes()))


def file_ids(index: DataIndex, blend: bool) -> dict[str, list[FileId]]:
    """The same view of a run's data index as :meth:`DataFingerprint.files`."""
    out = {(f"train.{name}" if blend else "train"): [FileId(path=f.path, size=f.size, sha256=f.sha256) for f in entry.files]
           for name, entry in index.train.items()}
    out.update({name: [FileId(path=f.path, size=f.size, sha256=f.sha256) for f in entry.files]
                for name, entry in index.validation.items()})
    return out
