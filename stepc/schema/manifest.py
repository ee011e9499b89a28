"""The manifest read back as types: the runtime's and the commands' view of a compiled run.

`manifest.json` is canonical JSON (stepc.rundir); this re-validates its "spec" into the pydantic
`Spec` (every default was filled in at compile time, so validation only checks) and its "plan"
into `Plan`, so nothing downstream indexes dicts by strings.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from stepc.errors import UserError
from stepc.rundir import manifest_path, read_manifest
from stepc.schema.plan import Plan, StagePlan
from stepc.schema.spec import Spec


class ManifestError(ValueError):
    """The manifest's spec or plan does not have the shape this stepc writes."""


@dataclass(frozen=True)
class Manifest:
    raw: dict[str, Any]  # the JSON as read: hashes and identities are computed over it
    spec: Spec
    plan: Plan

    @classmethod
    def from_json(cls, raw: Any) -> Manifest:
        if not isinstance(raw, dict) or not isinstance(raw.get("spec"), dict) or not isinstance(raw.get("plan"), dict):
            raise ManifestError("not a stepc manifest (it needs \"spec\" and \"plan\" objects)")
        try:
            # JSON mode: strict fields accept JSON arrays for tuples (train.betas) as when read from TOML.
            spec = Spec.model_validate_json(json.dumps(raw["spec"]))
            plan = Plan.model_validate(raw["plan"])
        except ValidationError as exc:
            first = exc.errors(include_url=False)[0]
            where = ".".join(str(p) for p in first["loc"])
            raise ManifestError(f"its {where} is invalid ({first['msg']}): written by another stepc version, or edited") from None
        return cls(raw, spec, plan)

    def stage(self, index: int) -> StagePlan:
        return self.plan.stages[index - 1]

    @property
    def num_stages(self) -> int:
        return len(self.plan.stages)


def load_manifest(path: str | Path) -> Manifest:
    """The typed manifest of a run directory (or of its manifest.json); a UserError naming the file otherwise."""
    raw = read_manifest(path)
    try:
        return Manifest.from_json(raw)
    except ManifestError as exc:
        raise UserError(str(exc), file=str(manifest_path(path)), fix="pass a manifest.json written by `stepc compile` (recompile with --force)") from None
