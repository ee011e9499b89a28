"""The freeze pass: Spec + Plan -> Manifest, a canonical JSON document with a content hash.

The hash covers everything but itself, so the runtime can refuse a hand-edited manifest and
`stepc verify` can prove a run directory is what the spec compiles to.
"""

from __future__ import annotations

import json
import platform
import shutil
import subprocess
from functools import cache
from importlib import metadata
from typing import Any

from stepc import __version__
from stepc.hashing import content_hash, digest
from stepc.schema.manifest import SCHEMA
from stepc.schema.plan import Plan
from stepc.schema.spec import Spec


def freeze(spec: Spec, plan: Plan, files: dict[str, bytes], overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The manifest for `spec`/`plan` whose emitted files are `files` (name -> bytes).

    `overrides`: the command line's --set values (key path -> value), recorded only when given so a
    spec compiled without any keeps its manifest (and hash) unchanged.
    """
    manifest = {
        "schema": SCHEMA,
        "stepc_version": __version__,
        "spec": spec.model_dump(mode="json"),
        "plan": plan.model_dump(mode="json"),
        "environment": environment(),
        "files": {name: digest(data) for name, data in sorted(files.items())},
    }
    if overrides:
        manifest["overrides"] = dict(sorted(overrides.items()))
    manifest["hash"] = content_hash(manifest)
    return manifest


def dumps(manifest: dict[str, Any]) -> str:
    """The manifest file's text: canonical content, indented for people."""
    return json.dumps(manifest, sort_keys=True, indent=2, ensure_ascii=False, allow_nan=False) + "\n"


@cache
def environment() -> dict[str, str]:
    """Versions that can change a run's numbers; `stepc diff` reports them apart from spec/plan changes."""
    env = {"python": platform.python_version()}
    for package in ("torch", "transformers", "pyomo", "pydantic", "tokenizers", "numpy"):
        try:
            env[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            env[package] = "absent"
    env["glpk"] = _glpk_version()
    return env


def _glpk_version() -> str:
    if shutil.which("glpsol") is None:
        return "absent"
    try:
        out = subprocess.run(["glpsol", "--version"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    first = out.splitlines()[0] if out else ""
    return first.rsplit(" ", 1)[-1] if first else "unknown"
