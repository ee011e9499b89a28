"""The typed sweep record: SWEEP_DIR/sweep.json, written by `stepc sweep`, read by submit and report.

Like a manifest it carries a content hash over everything but itself and the hashes of the files it
vouches for (sweep.sbatch, plan.md), so `stepc submit` can refuse an edited sweep before anything
is queued. Point names are run-directory names beside the sweep directory: the experiment-name
pattern keeps them there (no "/" or "..").
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

NAME = r"^[a-z0-9][a-z0-9._-]*$"  # experiment.name's pattern (stepc.schema.spec.Experiment)
DIGEST = r"^sha256:[0-9a-f]{64}$"


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SweepPoint(_Record):
    name: str = Field(pattern=NAME, max_length=100)
    """The point's run directory (a sibling of the sweep directory) and experiment name."""
    values: dict[str, Any]
    """Grid key -> this point's value."""
    manifest_hash: str = Field(pattern=DIGEST)
    """The content hash of the point's manifest.json when the sweep was compiled."""


class SweepRecord(_Record):
    name: str = Field(pattern=NAME, max_length=100)
    """The base spec's experiment name."""
    grid: dict[str, list[Any]]
    """Grid key -> its values, in --grid order."""
    points: list[SweepPoint] = Field(min_length=1)
    """One per job-array task, in array order."""
    files: dict[str, str]
    """The sweep directory's compiled files and their digests ("sha256:<hex>")."""
    hash: str = Field(pattern=DIGEST)
    """The content hash of this record without this key (stepc.rundir.content_hash)."""
