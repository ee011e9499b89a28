"""`stepc verify`: a run directory is exactly what its embedded spec compiles to."""

from __future__ import annotations

from pathlib import Path

from stepc.commands.diff import Change, diff
from stepc.compiler import compile_spec
from stepc.rundir import RunDir, content_hash, digest, read_manifest


def verify_run_dir(run_dir: Path, notes: list[str] | None = None) -> list[str]:
    """Problems found (empty when the directory verifies).

    Version differences between the recorded and the current environment are not problems (the
    directory is still exactly what the spec compiles to); they are appended to `notes`.
    """
    problems: list[str] = []
    manifest = read_manifest(run_dir)
    if manifest.get("hash") != content_hash(manifest):
        problems.append(f"manifest.json: content hash mismatch (recorded {manifest.get('hash')}, actual {content_hash(manifest)}): it was edited")
    for name, recorded in sorted(manifest.get("files", {}).items()):
        path = run_dir / name
        if not path.exists():
            problems.append(f"{name}: missing")
        elif digest(path.read_bytes()) != recorded:
            problems.append(f"{name}: content differs from the hash recorded in manifest.json")
    spec_path = RunDir(run_dir).spec
    if spec_path.exists():
        fresh = compile_spec(spec_path.read_text(encoding="utf-8"), str(spec_path)).manifest
        changes: list[Change] = diff(manifest, fresh)
        problems += [f"recompiling spec.toml gives a different {c.path}: {c.old!r} -> {c.new!r}"
                     for c in changes if c.section != "environment"]
        if notes is not None:
            notes += [f"note: compiled under {c.path} = {c.old!r}, now {c.new!r}" for c in changes if c.section == "environment"]
    return problems
