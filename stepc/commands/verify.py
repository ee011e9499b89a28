"""`stepc verify`: a run directory is exactly what its embedded spec compiles to.

Everything wrong inside the run directory is a finding (exit 1, "FAILED"), not a crash: a damaged
or hand-edited manifest, a compiled file that is missing, edited, a directory, a FIFO or a symlink
(never followed), a `files` entry that points outside the directory, and a spec.toml that no longer
compiles. Only a path that holds no manifest file at all (missing, a directory, a FIFO) is a user
error (exit 2).
"""

from __future__ import annotations

from pathlib import Path

from stepc.commands.diff import Change, diff
from stepc.compiler import compile_spec
from stepc.errors import UserError
from stepc.rundir import entry_problem, manifest_path, RunDir
from stepc.schema.manifest import Manifest, ManifestError, read_manifest_json


def verify_run_dir(run_dir: Path, notes: list[str] | None = None) -> list[str]:
    """Problems found (empty when the directory verifies). `run_dir` may also be its manifest.json.

    Every problem Manifest.problems lists is one, except version differences between the recorded and
    the current environment (the directory is still exactly what the spec compiles to): those are
    appended to `notes`, from the recompile's diff of every recorded version.
    """
    path = manifest_path(run_dir)
    run_dir = path.parent
    try:
        raw = read_manifest_json(path)
    except UserError as err:
        if not path.is_file():
            raise  # no manifest file here (missing, a directory, a FIFO): a wrong path, exit 2
        return [f"manifest.json: {'[' + err.key + '] ' if err.key else ''}{err.message}"]
    try:
        manifest = Manifest.from_json(raw)
    except ManifestError as exc:
        return [f"manifest.json: {'[' + exc.key + '] ' if exc.key else ''}{exc}"]
    problems = [p.message for p in manifest.problems(run_dir) if p.kind != "version"]
    if "spec.toml" not in manifest.files:
        problems.append("manifest.json: records no spec.toml, so the run directory cannot be recompiled")
    elif entry_problem(run_dir, "spec.toml") is None:
        problems += _recompile(RunDir(run_dir).spec, manifest.raw, manifest.overrides, notes)
    return problems


def _recompile(spec_path: Path, manifest: dict, overrides: dict, notes: list[str] | None) -> list[str]:
    """Recompile spec.toml (read once) and compare; a spec that no longer compiles is a finding."""
    data = spec_path.read_bytes()
    try:
        # spec.toml already has any --set values applied; the manifest's record of them is carried over
        fresh = compile_spec(data.decode("utf-8"), str(spec_path), overrides or None).manifest
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
