"""The compiler: spec.toml text -> validated Spec -> Plan -> Manifest + run-directory files.

    parse (load, checks) -> plan (memory, layout, schedule) -> freeze (manifest) -> render (emit, figure, plan_table)

Every pass is a pure function; `compile_spec` chains them and is the one pipeline that the CLI
(`compile`, `plan`) and `stepc verify` use. Only `emit.write_run_dir` touches the disk.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from stepc.errors import UserError
from stepc.schema.plan import Plan
from stepc.schema.spec import Spec


@dataclass(frozen=True)
class Compiled:
    spec: Spec
    plan: Plan
    manifest: dict[str, Any]
    files: dict[str, bytes]  # every run-directory file by name, manifest.json included


def plan_spec(text: str, file: str, strict: bool = False) -> tuple[Spec, Plan]:
    """Parse, validate and solve; errors name `file`. `strict` (compile): what the plan reads outside the
    spec (method "sft": the init_from run's export, the instruction data) must exist; otherwise
    (`stepc plan`) the plan shows what it can without it."""
    from stepc.compiler.load import parse_spec
    from stepc.compiler.plan import make_plan
    from stepc.compiler.sft import resolve

    spec = parse_spec(text, file)
    try:
        return spec, make_plan(spec, resolve(spec, file, strict))
    except UserError as err:
        err.file = err.file or file
        raise


def compile_spec(text: str, file: str, overrides: dict[str, Any] | None = None) -> Compiled:
    """The whole pipeline: the manifest and every file of the run directory, nothing written.

    `text` is the resolved spec (any --set values already applied: it becomes spec.toml);
    `overrides` (key path -> value) is recorded in the manifest."""
    from stepc.compiler.emit import render_files
    from stepc.compiler.manifest import dumps, freeze

    spec, plan = plan_spec(text, file, strict=True)
    files = render_files(spec, plan, text)
    manifest = freeze(spec, plan, files, overrides)
    files["manifest.json"] = dumps(manifest).encode()
    return Compiled(spec, plan, manifest, files)
