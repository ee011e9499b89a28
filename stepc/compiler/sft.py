"""Instruction tuning at compile time (method "sft"): what an SFT run takes from the run it tunes, and
what its plan depends on outside the spec.

* `inherit_model` (before validation): the [model] of an SFT run is its init_from run's, read from
  that run's manifest; a [model] table in the SFT spec is optional and, when given, must match it
  (it lets `stepc plan` plan the run before init_from was ever compiled).
* `resolve` (the plan pass): the init_from run's identity (experiment, manifest hash, and the sha256 of
  every file of its export, from the export's seal) and the instruction data's (each file's size,
  sha256 and example count). Both go into the manifest, so the plan's steps
  (ceil(epochs x examples / batch_size)) are exact and reproducible: a recompile against another
  export or other data is another plan, which `stepc verify` and the stage preflight notice.
  `stepc compile` refuses an init_from without a finished export and missing data (exit 2);
  `stepc plan` shows what it can and says what is missing.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from stepc.errors import UserError
from stepc.rundir import export_seal_files, RunDir
from stepc.schema.conversations import scan
from stepc.schema.methods import METHODS
from stepc.schema.plan import InitFrom, InstructionData, SftPlan
from stepc.schema.spec import Spec

NOT_A_RUN_FIX = ("compile and train that run first (`stepc compile SPEC` then `stepc run runs/NAME`), and run stepc from the "
                 "directory init_from is relative to")


def _starts_from_export(raw: dict[str, Any]) -> bool:
    experiment = raw.get("experiment")
    name = experiment.get("method") if isinstance(experiment, dict) else None
    method = METHODS.get(name) if isinstance(name, str) else None  # anything else: validation names it
    return method is not None and method.starts_from == "export"


def inherit_model(raw: dict[str, Any], file: str) -> dict[str, Any]:
    """The raw TOML document with [model] filled from the init_from run, and [memory] when absent (an SFT run
    has one stage of the whole model: no layout, no budget; memory is counted with init_from's
    memory.accounting). Other methods' documents pass unchanged."""
    if not _starts_from_export(raw):
        return raw
    sft = raw.get("sft")
    init_from = sft.get("init_from") if isinstance(sft, dict) else None
    given = raw.get("model")
    raw = {**raw, "memory": raw.get("memory", {})}
    if not isinstance(init_from, str) or not init_from.strip():
        return raw  # validation names the missing or malformed key
    try:
        from stepc.schema.manifest import load_manifest

        source = load_manifest(init_from)
    except UserError as err:
        if isinstance(given, dict):
            return raw  # planned from the given [model]; `stepc compile` needs the run itself
        raise UserError(f"init_from {init_from!r} is not a compiled run: {err.message}", file=file, key="sft.init_from",
                        fix=f"{NOT_A_RUN_FIX} (or give its [model] table, so `stepc plan` can plan without it)") from None
    if raw["memory"] == {}:
        raw["memory"] = {"accounting": source.spec.memory.accounting}
    inherited = source.raw["spec"]["model"]
    if isinstance(given, dict):
        for key, value in given.items():
            if key in inherited and inherited[key] != value:
                raise UserError(f"{init_from} trained a model with {key} = {inherited[key]!r}, not {value!r}; an SFT run "
                                "tunes that model as it is", file=file, key=f"model.{key}",
                                fix="remove [model] (an SFT run's model is its init_from run's) or make it match")
        return {**raw, "model": {**inherited, **given}}  # an unknown key stays, for validation to name
    return {**raw, "model": inherited}


def resolve(spec: Spec, file: str, strict: bool) -> SftPlan | None:
    """The SFT facts the plan needs (None for other methods). `strict` (compile): an unfinished init_from
    or missing data is an error; otherwise (plan) they stay unresolved with the reason."""
    if spec.method.starts_from != "export":
        return None
    assert spec.sft is not None  # checks.normalize requires [sft] for this method
    reasons = []
    init_from = _init_from(spec, file, strict)
    if init_from is None:
        reasons.append(f"{spec.sft.init_from} has no finished export yet")
    try:
        files = scan(list(spec.sft.train), spec.sft.format)
    except UserError as err:
        err.file = err.file or file
        if strict or "matches no file" not in err.message:
            raise
        files = None
        reasons.append(f"the data is missing ({err.message})")
    data = None if files is None else [InstructionData(path=f.path, size=f.size, sha256=f.sha256, examples=f.examples)
                                       for f in files]
    examples = None if files is None else sum(f.examples for f in files)
    unresolved = "; ".join(reasons) + "; `stepc compile` resolves the steps once both exist" if reasons else None
    return SftPlan(init_from=init_from, data=data, examples=examples, unresolved=unresolved)


def _init_from(spec: Spec, file: str, strict: bool) -> InitFrom | None:
    from stepc.schema.manifest import load_manifest

    where = spec.sft.init_from
    try:
        source = load_manifest(where)
    except UserError as err:
        if not strict:
            return None
        raise UserError(f"init_from {where!r} is not a compiled run: {err.message}", file=file, key="sft.init_from",
                        fix=NOT_A_RUN_FIX) from None
    export = RunDir(Path(where)).export
    files = export_seal_files(export)
    if files is None:
        if not strict:
            return None
        raise UserError(f"init_from {where!r} has not finished: {export} is missing or incomplete (no seal listing its files)",
                        file=file, key="sft.init_from",
                        fix=f"finish that run first (`stepc run {where}` resumes it), then compile this spec")
    return InitFrom(run_dir=where, experiment=source.spec.experiment.name, method=source.spec.experiment.method,
                    manifest_hash=source.hash, export=dict(sorted(files.items())))


def steps(spec: Spec, sft: SftPlan | None) -> int:
    """ceil(epochs x examples / batch_size): every example is seen at least `epochs` times; 0 while unresolved."""
    if sft is None or sft.examples is None or spec.sft is None:
        return 0
    return math.ceil(spec.sft.epochs * sft.examples / spec.sft.batch_size)
