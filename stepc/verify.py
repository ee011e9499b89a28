"""`stepc verify`: a run directory is exactly what its embedded spec compiles to.

Everything wrong inside the run directory is a finding (exit 1, "FAILED"), not a crash: a damaged
or hand-edited manifest, a compiled file that is missing, edited, a directory, a FIFO or a symlink
(never followed), a `files` entry that points outside the directory, and a spec.toml that no longer
compiles. Only a path that holds no run directory at all is a user error (exit 2).
"""

from __future__ import annotations

from pathlib import Path

from stepc.diff import Change, diff
from stepc.emit import compile_files
from stepc.errors import UserError
from stepc.load import parse_spec
from stepc.manifest import content_hash, sha256_bytes
from stepc.plan import make_plan
from stepc.rundir_checks import (check_manifest, file_entry_problem, manifest_path, read_manifest_json,
                                 run_dir_entry_problem)


def verify_run_dir(run_dir: Path, notes: list[str] | None = None) -> list[str]:
    """Problems found (empty when the directory verifies).

    Version differences between the recorded and the current environment are not problems (the
    directory is still exactly what the spec compiles to); they are appended to `notes`.
    """
    path = manifest_path(run_dir)
    run_dir = path.parent
    raw = read_manifest_json(path)  # exit 2: no manifest at all, or not JSON
    try:
        manifest = check_manifest(raw, str(path), files=False)  # each bad files entry is listed below
    except UserError as err:  # a manifest that is there but damaged is a finding about this directory
        return [f"manifest.json: {'[' + err.key + '] ' if err.key else ''}{err.message}"]
    problems: list[str] = []
    if manifest.get("hash") != content_hash(manifest):
        problems.append(f"manifest.json: content hash mismatch (recorded {manifest.get('hash')}, actual {content_hash(manifest)}): it was edited")
    for name, digest in sorted(manifest["files"].items()):
        entry = file_entry_problem(name, digest)
        if entry:
            problems.append(f"manifest.json: [files.{name}] {entry}")
            continue
        problem = run_dir_entry_problem(run_dir, name)
        if problem:
            problems.append(problem)
        elif sha256_bytes((run_dir / name).read_bytes()) != digest:
            problems.append(f"{name}: content differs from the hash recorded in manifest.json")
    if "spec.toml" not in manifest["files"]:
        problems.append("manifest.json: records no spec.toml, so the run directory cannot be recompiled")
    elif run_dir_entry_problem(run_dir, "spec.toml") is None:
        problems += _recompile(run_dir / "spec.toml", manifest, notes)
    return problems


def _recompile(spec_path: Path, manifest: dict, notes: list[str] | None) -> list[str]:
    data = spec_path.read_bytes()
    try:
        text = data.decode("utf-8")
        spec = parse_spec(text, str(spec_path))
        fresh, _ = compile_files(spec, make_plan(spec), text)
    except UnicodeDecodeError:
        return ["spec.toml: is not UTF-8 text, so it cannot be recompiled"]
    except UserError as err:
        where = f"[{err.key}] " if err.key else ""
        return [f"spec.toml: no longer compiles: {where}{err.message.splitlines()[0]}"]
    changes: list[Change] = diff(manifest, fresh)
    if notes is not None:
        notes += [f"note: compiled under {c.path} = {c.old!r}, now {c.new!r}" for c in changes if c.section == "environment"]
    return [f"recompiling spec.toml gives a different {c.path}: {c.old!r} -> {c.new!r}"
            for c in changes if c.section != "environment"]
