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
from stepc.rundir import files_entry_problem, manifest_path, read_manifest
from stepc.schema.plan import Plan, StagePlan
from stepc.schema.spec import Spec


SCHEMA = 1
"""The manifest layout this stepc writes and reads; another value means another stepc wrote it."""


class ManifestError(ValueError):
    """The manifest's spec or plan does not have the shape this stepc writes; `key` is the manifest key path."""

    def __init__(self, message: str, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


@dataclass(frozen=True)
class Manifest:
    raw: dict[str, Any]  # the JSON as read: hashes and identities are computed over it
    spec: Spec
    plan: Plan

    @classmethod
    def from_json(cls, raw: Any) -> Manifest:
        if not isinstance(raw, dict) or not isinstance(raw.get("spec"), dict) or not isinstance(raw.get("plan"), dict):
            raise ManifestError("not a stepc manifest (it needs \"spec\" and \"plan\" objects)")
        if raw.get("schema") != SCHEMA or isinstance(raw.get("schema"), bool):  # before the spec: its keys may differ
            raise ManifestError(f"schema is {json.dumps(raw.get('schema'))}, but this stepc reads manifest schema {SCHEMA} "
                                f"(written by stepc {raw.get('stepc_version', 'of another version')})", key="schema")
        try:
            # JSON mode: strict fields accept JSON arrays for tuples (train.betas) as when read from TOML.
            spec = Spec.model_validate_json(json.dumps(raw["spec"]))
        except ValidationError as exc:
            raise _invalid("spec", exc) from None
        try:
            plan = Plan.model_validate(raw["plan"])
        except ValidationError as exc:
            raise _invalid("plan", exc) from None
        _check_plan(plan)
        return cls(raw, spec, plan)

    def stage(self, index: int) -> StagePlan:
        return self.plan.stages[index - 1]

    @property
    def num_stages(self) -> int:
        return len(self.plan.stages)


def _invalid(part: str, exc: ValidationError) -> ManifestError:
    first = exc.errors(include_url=False)[0]
    where = _key(part, first["loc"])
    return ManifestError(f"{where} is invalid ({first['msg']}): written by another stepc version, or edited", key=where)


def _key(part: str, loc: tuple) -> str:
    key = part
    for item in loc:
        key += f"[{item}]" if isinstance(item, int) else f".{item}"
    return key


def _check_plan(plan: Plan) -> None:
    """What the types cannot say: stages numbered 1..K, counts that are not negative."""
    if not plan.stages:
        raise ManifestError("plan.stages is empty: a plan has at least one stage", key="plan.stages")
    for i, stage in enumerate(plan.stages):
        if stage.index != i + 1:
            raise ManifestError(f"plan.stages[{i}].index is {stage.index}, not {i + 1}", key=f"plan.stages[{i}].index")
        for name in ("new_layers", "total_layers", "frozen_layers", "steps", "nominal_steps", "tokens", "data_step_offset"):
            if getattr(stage, name) < 0:
                raise ManifestError(f"plan.stages[{i}].{name} is negative", key=f"plan.stages[{i}].{name}")
        if not stage.flops >= 0:
            raise ManifestError(f"plan.stages[{i}].flops is not a non-negative number", key=f"plan.stages[{i}].flops")


def load_manifest(path: str | Path) -> Manifest:
    """The typed manifest of a run directory (or of its manifest.json); a UserError naming the file otherwise."""
    raw = read_manifest(path)  # refuses non-regular files and JSON that is not a manifest
    fix = "pass a manifest.json written by `stepc compile` (recompile with --force)"
    try:
        manifest = Manifest.from_json(raw)
    except ManifestError as exc:
        if exc.key == "schema":
            fix = ("recompile the run's spec with this stepc (`stepc compile RUN_DIR/spec.toml --force` keeps the "
                   "checkpoints), or use the stepc that wrote it")
        raise UserError(str(exc), file=str(manifest_path(path)), key=exc.key, fix=fix) from None
    for name, recorded in raw["files"].items():
        problem = files_entry_problem(name, recorded)
        if problem:
            raise UserError(problem, file=str(manifest_path(path)), key=f"files.{name}", fix=fix)
    return manifest
