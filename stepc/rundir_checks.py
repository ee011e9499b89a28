"""What the commands that read a run directory (verify, diff, run, eval, report) may trust in it.

A run directory is user-controlled: a path may name a FIFO, a device, a directory or a symlink out of
the tree, and manifest.json may be any JSON at all. These checks turn each of those into a
`UserError` naming the file (and the manifest key path) before any command indexes into the data,
so no command hangs, follows a link out of the run directory, or dies in a KeyError.

Hand-written rather than a pydantic model of the manifest: the manifest's spec part *is* validated
by the pydantic `Spec`; the plan and file table are checked here for exactly the fields the
commands read, so that a field added to the plan later does not invalidate older run directories.
"""

from __future__ import annotations

import json
import os
import re
import stat
from pathlib import Path, PurePosixPath
from typing import Any

from stepc.errors import UserError

MAX_MANIFEST_BYTES = 64 << 20
MANIFEST_KEYS = ("schema", "stepc_version", "spec", "plan", "environment", "files", "hash")
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
_STAGE_INTS = ("index", "new_layers", "total_layers", "frozen_layers", "steps", "tokens", "data_step_offset")
_PLAN_INTS = ("peak_bytes", "vanilla_peak_bytes")


def read_regular_file(path: Path, what: str, fix: str, max_bytes: int) -> bytes:
    """The bytes of `path`, refusing anything but a regular file of at most `max_bytes`: a FIFO or a
    device would block or never end, a directory cannot be read. Symlinks are followed (the user named
    the path); links inside a run directory are judged by `run_dir_entry_problem`."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise UserError(f"no {what} here", file=str(path), fix=fix) from None
    except OSError as exc:
        raise UserError(f"cannot read the {what}: {exc.strerror}", file=str(path), fix=fix) from None
    if not stat.S_ISREG(info.st_mode):
        kind = "a directory" if stat.S_ISDIR(info.st_mode) else "not a regular file (a pipe, socket or device)"
        raise UserError(f"the {what} path is {kind}", file=str(path), fix=fix)
    if info.st_size > max_bytes:
        raise UserError(f"the {what} is {info.st_size} bytes, larger than any {what} stepc writes", file=str(path), fix=fix)
    try:
        return path.read_bytes()
    except OSError as exc:
        raise UserError(f"cannot read the {what}: {exc.strerror}", file=str(path), fix=fix) from None


def manifest_path(path: str | Path) -> Path:
    """RUN_DIR or RUN_DIR/manifest.json -> the manifest file."""
    path = Path(path)
    return path / "manifest.json" if path.is_dir() else path


def read_manifest_json(path: Path) -> Any:
    fix = "pass a run directory made by `stepc compile` or its manifest.json"
    data = read_regular_file(path, "manifest", fix, MAX_MANIFEST_BYTES)
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise UserError(f"not a readable manifest: {exc}", file=str(path), fix=fix) from None


def check_is_manifest(obj: Any, file: str) -> dict[str, Any]:
    """The top-level shape every manifest has: enough for `stepc diff` to compare two of them."""
    fix = "pass a manifest.json written by `stepc compile` (recompile the spec to get a fresh one)"
    if not isinstance(obj, dict):
        raise UserError(f"not a manifest: the JSON is {type(obj).__name__ if obj is not None else 'null'}, not an object",
                        file=file, fix=fix)
    missing = [k for k in MANIFEST_KEYS if k not in obj]
    if missing:
        raise UserError(f"not a manifest: no {', '.join(missing)} (a manifest has {', '.join(MANIFEST_KEYS)})",
                        file=file, fix=fix)
    for key in ("spec", "plan", "environment", "files"):
        if not isinstance(obj[key], dict):
            raise UserError(f"{key} is {_kind(obj[key])}, not an object", file=file, key=key, fix=fix)
    return obj


def check_manifest(obj: Any, file: str, files: bool = True) -> dict[str, Any]:
    """Everything the commands read from a manifest, with the key path of the first thing wrong.

    `files=False` leaves the `files` entries to the caller (verify lists every bad one).
    """
    manifest = check_is_manifest(obj, file)
    fix = "recompile the spec (`stepc compile SPEC --force`) to get a well-formed manifest.json"
    for name, digest in manifest["files"].items() if files else ():
        problem = file_entry_problem(name, digest)
        if problem:
            raise UserError(problem, file=file, key=f"files.{name}", fix=fix)
    plan = manifest["plan"]
    if not isinstance(plan.get("method"), str):
        raise UserError(f"plan.method is {_kind(plan.get('method'))}, not a string", file=file, key="plan.method", fix=fix)
    for key in _PLAN_INTS:
        _need_int(plan.get(key), f"plan.{key}", file, fix)
    if plan.get("budget_bytes") is not None:
        _need_int(plan["budget_bytes"], "plan.budget_bytes", file, fix)
    layers = plan.get("layers")
    if not isinstance(layers, list) or not layers or not all(_is_int(n) and n >= 0 for n in layers):
        raise UserError(f"plan.layers is {_kind(layers)}, not a list of layer counts", file=file, key="plan.layers", fix=fix)
    stages = plan.get("stages")
    if not isinstance(stages, list) or not stages:
        raise UserError(f"plan.stages is {_kind(stages)}, not a non-empty list", file=file, key="plan.stages", fix=fix)
    for i, stage in enumerate(stages):
        where = f"plan.stages[{i}]"
        if not isinstance(stage, dict):
            raise UserError(f"{where} is {_kind(stage)}, not an object", file=file, key=where, fix=fix)
        for key in _STAGE_INTS:
            _need_int(stage.get(key), f"{where}.{key}", file, fix)
        if stage["index"] != i + 1:
            raise UserError(f"{where}.index is {stage['index']}, not {i + 1}", file=file, key=f"{where}.index", fix=fix)
        flops = stage.get("flops")
        if not (isinstance(flops, (int, float)) and not isinstance(flops, bool) and flops >= 0):
            raise UserError(f"{where}.flops is {_kind(flops)}, not a number", file=file, key=f"{where}.flops", fix=fix)
    _check_spec(manifest["spec"], file, fix)
    return manifest


def _check_spec(raw: dict[str, Any], file: str, fix: str) -> None:
    from pydantic import ValidationError

    from stepc.load import _to_user_error
    from stepc.spec import Spec

    try:
        Spec.model_validate(raw)
    except ValidationError as exc:
        err = _to_user_error(exc, raw, file)
        err.key = f"spec.{err.key}" if err.key else "spec"
        err.fix = fix
        raise err from None


def file_entry_problem(name: Any, digest: Any) -> str | None:
    """Why a manifest `files` entry cannot name a compiled file of this run directory, or None."""
    if not isinstance(digest, str) or not _DIGEST.fullmatch(digest):
        return f"the recorded hash of {name!r} is {_kind(digest)}, not \"sha256:<64 hex digits>\""
    parts = PurePosixPath(name).parts
    if not name or "\\" in name or "\x00" in name or PurePosixPath(name).is_absolute() or ".." in parts or "." in parts:
        return f"{name!r} points outside the run directory (a compiled file is a plain name inside it)"
    return None


def run_dir_entry_problem(run_dir: Path, name: str) -> str | None:
    """Why run_dir/name cannot be read as a compiled file (missing, a symlink, a directory, a FIFO...)."""
    path = run_dir / name
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return f"{name}: missing"
    except OSError as exc:
        return f"{name}: cannot be read ({exc.strerror})"
    if stat.S_ISLNK(info.st_mode):
        return f"{name}: is a symbolic link (to {os.readlink(path)!r}); a compiled file is never a link, and verify does not follow one"
    if stat.S_ISDIR(info.st_mode):
        return f"{name}: is a directory, not the compiled file"
    if not stat.S_ISREG(info.st_mode):
        return f"{name}: is not a regular file (a pipe, socket or device)"
    real = os.path.realpath(path)
    if os.path.commonpath([real, os.path.realpath(run_dir)]) != os.path.realpath(run_dir):
        return f"{name}: resolves outside the run directory ({real})"
    return None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _need_int(value: Any, key: str, file: str, fix: str) -> None:
    if not _is_int(value) or value < 0:
        raise UserError(f"{key} is {_kind(value)}, not a non-negative integer", file=file, key=key, fix=fix)


def _kind(value: Any) -> str:
    shown = json.dumps(value, ensure_ascii=False) if not isinstance(value, (dict, list)) else type(value).__name__
    shown = shown if len(shown) <= 40 else shown[:37] + "..."
    return "missing" if value is None else shown
