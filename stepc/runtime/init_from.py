"""Where a stage's weights come from: stage i-1's export, or for stage 1 of a method that starts from an
export (method "sft") the [sft] init_from run's export, which must still be the one `stepc compile`
recorded in manifest.json (plan.sft.init_from: the sha256 of every file). Torch-free: the stage
preflight runs it before torchrun (hashing every file), the ranks again after it (sizes only).
"""

from __future__ import annotations

from pathlib import Path

from stepc.rundir import export_seal_files, RunDir
from stepc.runtime.guard import RuntimeFailure, is_exported, previous_stage_export
from stepc.runtime.model.export_seal import ExportDamaged
from stepc.runtime.model.export_seal import check as check_export
from stepc.schema.manifest import Manifest


def starting_export(run_dir: Path, manifest: Manifest, stage: int, hashes: bool = False) -> Path | None:
    """The export stage `stage` starts from (None: fresh weights); refuses one that is unfinished,
    damaged, or (init_from) not the one compiled against."""
    if stage == 1 and manifest.spec.method.starts_from == "export":
        return init_from_export(manifest, hashes)
    return previous_stage_export(run_dir, stage, hashes)


def init_from_export(manifest: Manifest, hashes: bool) -> Path:
    record = manifest.plan.sft.init_from if manifest.plan.sft is not None else None
    if record is None:
        raise RuntimeFailure("manifest.json records no init_from export (it was planned by `stepc plan`, not compiled); "
                             "compile the spec with `stepc compile SPEC --force`")
    source = record.run_dir
    export = RunDir(Path(source)).export
    recompile = "recompile this spec (`stepc compile SPEC --force`) to tune the export as it is now"
    if not is_exported(export):
        raise RuntimeFailure(f"[sft] init_from {source}: its export {export} is missing or unfinished (relative to "
                             f"{Path.cwd()}), but this run was compiled against a finished one. Launch from the directory "
                             f"init_from is relative to, finish that run (`stepc run {source}`) or restore its export")
    try:
        check_export(export, hashes)
    except ExportDamaged as exc:
        raise RuntimeFailure(f"[sft] init_from {source}: its export is damaged: {exc}. Restore it, or move {export} aside "
                             "and rerun that run's last stage (it re-exports from its last checkpoint), "
                             f"then {recompile}") from None
    sealed = export_seal_files(export) or {}
    if sealed != record.export:
        changed = sorted(n for n in set(sealed) | set(record.export) if sealed.get(n) != record.export.get(n))
        raise RuntimeFailure(f"[sft] init_from {source}: its export changed since this run was compiled "
                             f"({', '.join(changed[:4])} differ from the sha256s manifest.json records). "
                             f"Restore the original export, or {recompile}")
    return export
