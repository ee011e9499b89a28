"""The manifest read back as types, and checked against its run directory: the one view of a compiled
run that the runtime's preflight, `stepc run`, `stepc submit` and `stepc verify` share.

`manifest.json` is canonical JSON (stepc.hashing); `load_manifest` reads it (a regular file of a
bounded size, a JSON object with every manifest key), re-validates its "spec" into the pydantic
`Spec` (every default was filled in at compile time, so validation only checks) and its "plan" into
`Plan`, and types its outer fields, so nothing downstream indexes dicts by strings.
`Manifest.problems(run_dir)` lists every way the run directory differs from it (the manifest's own
hash, each compiled file, the stepc and torch versions); each caller only decides which problems
stop it and which it reports.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

from pydantic import ValidationError

from stepc import __version__
from stepc.errors import UserError
from stepc.hashing import content_hash, digest
from stepc.rundir import (entry_problem, files_entry_problem, manifest_path, read_regular_file, sweep_dir_error, SWEEP_FILE)
from stepc.schema.plan import Plan, StagePlan
from stepc.schema.spec import Spec

MAX_MANIFEST_BYTES = 64 << 20
MANIFEST_KEYS = ("schema", "stepc_version", "spec", "plan", "environment", "files", "hash")


SCHEMA = 1
"""The manifest layout this stepc writes and reads; another value means another stepc wrote it."""


class ManifestError(ValueError):
    """The manifest's spec or plan does not have the shape this stepc writes; `key` is the manifest key path."""

    def __init__(self, message: str, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


@dataclass(frozen=True)
class Problem:
    """One way a run directory differs from its manifest."""

    kind: Literal["manifest", "file", "version"]  # the manifest itself; a compiled file; a package version
    name: str  # "manifest.json" (or "files.NAME" for a bad entry), the compiled file's name, or the package
    message: str  # one line, starting with the name
    state: Literal["edited", "missing", "unreadable", "changed"]  # other bytes than recorded; not there; not a
    # regular file inside the run directory (or an entry that cannot name one); a version that differs

    @property
    def sentence(self) -> str:
        """The problem said of its file: "stage-2.sh is missing", "run.sbatch differs from the script the
        manifest records"; the message otherwise."""
        return self.sentence_about(self.name)

    def sentence_about(self, file: object) -> str:
        """The same, naming the file as `file` (e.g. its full path)."""
        if self.kind == "file" and self.state == "edited":
            return f"{file} differs from the script the manifest records"
        if self.kind == "file" and self.state == "missing":
            return f"{file} is missing"
        return self.message


@dataclass(frozen=True)
class Manifest:
    raw: dict[str, Any]  # the JSON as read: hashes and identities are computed over it
    spec: Spec
    plan: Plan
    hash: str  # the recorded content hash ("sha256:<hex>")
    stepc_version: str
    files: dict[str, str]  # compiled file name -> its recorded "sha256:<hex>"
    environment: dict[str, str]  # package -> version at compile time
    overrides: dict[str, Any]  # --set key path -> value ({} when none)

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
        files = raw.get("files")
        if not isinstance(files, dict):
            raise ManifestError("files is not an object", key="files")
        environment = raw.get("environment")
        if not isinstance(environment, dict) or not all(isinstance(v, str) for v in environment.values()):
            raise ManifestError("environment is not an object of version strings", key="environment")
        overrides = raw.get("overrides", {})
        if not isinstance(overrides, dict):
            raise ManifestError("overrides is not an object", key="overrides")
        if not isinstance(raw.get("hash"), str) or not isinstance(raw.get("stepc_version"), str):
            raise ManifestError("hash and stepc_version must be strings", key="hash")
        return cls(raw, spec, plan, raw["hash"], raw["stepc_version"], dict(files), dict(environment), dict(overrides))

    def problems(self, run_dir: Path) -> list[Problem]:
        """Every way `run_dir` differs from this manifest, in this order: the manifest's own content hash
        (it was edited), each compiled file it lists (missing, not a regular file inside the directory,
        other bytes than recorded), and the stepc and torch versions it was compiled with."""
        out = []
        actual = content_hash(self.raw)
        if self.hash != actual:
            out.append(Problem("manifest", "manifest.json", f"manifest.json: content hash mismatch (recorded {self.hash}, "
                                                            f"actual {actual}): it was edited", "edited"))
        for name, recorded in sorted(self.files.items()):
            entry = files_entry_problem(name, recorded)
            if entry:
                out.append(Problem("manifest", f"files.{name}", f"manifest.json: [files.{name}] {entry}", "unreadable"))
                continue
            problem = entry_problem(run_dir, name)
            if problem:
                missing = not (run_dir / name).exists() and not (run_dir / name).is_symlink()
                out.append(Problem("file", name, problem, "missing" if missing else "unreadable"))
            elif digest((run_dir / name).read_bytes()) != recorded:
                out.append(Problem("file", name, f"{name}: content differs from the hash recorded in manifest.json", "edited"))
        now = current_versions()
        for package, recorded in (("stepc", self.stepc_version), ("torch", self.environment.get("torch"))):
            if recorded != now[package]:
                out.append(Problem("version", package, f"{package} {recorded} -> {now[package]}", "changed"))
        return out

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


def current_versions() -> dict[str, str]:
    """The versions a run's numbers depend on that a resume must not change silently."""
    try:
        torch = metadata.version("torch")
    except metadata.PackageNotFoundError:
        torch = "absent"
    return {"stepc": __version__, "torch": torch}


def read_manifest_json(path: str | Path) -> dict[str, Any]:
    """The JSON object of a manifest (a run directory or the file itself), before typing; a UserError
    naming the file when it is not a regular file, not JSON, or not a manifest at all (`[]`, a string,
    an object without its keys). The first half of `load_manifest`; alone, for what must read a manifest
    this stepc cannot type (`stepc diff` compares any two, `stepc verify` reports what is wrong)."""
    path = manifest_path(path)
    fix = "pass a run directory made by `stepc compile` or its manifest.json"
    if not path.exists() and (path.parent / SWEEP_FILE).is_file():
        raise sweep_dir_error(path.parent)
    data = read_regular_file(path, "manifest", fix, MAX_MANIFEST_BYTES)
    try:
        obj = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise UserError(f"not a readable manifest: {exc}", file=str(path), fix=fix) from None
    fix = "pass a manifest.json written by `stepc compile` (recompile the spec to get a fresh one)"
    if not isinstance(obj, dict):
        kind = "null" if obj is None else type(obj).__name__
        raise UserError(f"not a manifest: the JSON is {kind}, not an object", file=str(path), fix=fix)
    missing = [k for k in MANIFEST_KEYS if k not in obj]
    if missing:
        raise UserError(f"not a manifest: no {', '.join(missing)} (a manifest has {', '.join(MANIFEST_KEYS)})",
                        file=str(path), fix=fix)
    for key in ("spec", "plan", "environment", "files"):
        if not isinstance(obj[key], dict):
            raise UserError(f"{key} is {type(obj[key]).__name__}, not an object", file=str(path), key=key, fix=fix)
    return obj


def load_manifest(path: str | Path) -> Manifest:
    """The typed manifest of a run directory (or of its manifest.json); a UserError naming the file otherwise."""
    raw = read_manifest_json(path)
    fix = "pass a manifest.json written by `stepc compile` (recompile with --force)"
    try:
        manifest = Manifest.from_json(raw)
    except ManifestError as exc:
        if exc.key == "schema":
            fix = ("recompile the run's spec with this stepc (`stepc compile RUN_DIR/spec.toml --force` keeps the "
                   "checkpoints), or use the stepc that wrote it")
        raise UserError(str(exc), file=str(manifest_path(path)), key=exc.key, fix=fix) from None
    for name, recorded in manifest.files.items():  # a files entry that cannot name a compiled file: not ours
        problem = files_entry_problem(name, recorded)
        if problem:
            raise UserError(problem, file=str(manifest_path(path)), key=f"files.{name}", fix=fix)
    return manifest
