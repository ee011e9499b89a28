"""Refuse to train the wrong thing: manifest tampering, unfinished previous stages, drifted data or versions.

Each refusal says what differs and how to proceed; `--allow-<what>` overrides one check explicitly.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from typing import TYPE_CHECKING

from stepc.errors import UserError
from stepc.atomic import atomic_write_json, atomic_write_text
from stepc.hashing import canonical_json, digest
from stepc.rundir import CHECKPOINT_MARKER, RunDir
from stepc.runtime.model.export_seal import MARKER, ExportDamaged
from stepc.runtime.model.export_seal import check as check_export
from stepc.runtime.network import check_multi_node
from stepc.schema.manifest import Manifest, load_manifest
from stepc.schema.spec import Data

if TYPE_CHECKING:
    from stepc.runtime.data.index import DataFingerprint

ALLOWABLE = ("edited-manifest", "edited-scripts", "data-change", "version-change")
# Written last into an export directory (see export_seal.py, torch-free like this module, so the
# stage scripts' preflight starts in well under a second).
EXPORT_DONE = MARKER


def is_exported(path: Path) -> bool:
    return (path / EXPORT_DONE).is_file()


class RuntimeFailure(Exception):
    """A stage cannot (or must not) run; the message says why and what to do. Exit code 2."""


def load_verified_manifest(path: Path, allow: set[str]) -> Manifest:
    """The typed manifest, refused (RuntimeFailure) when it was edited, a stage script differs from it,
    or the stepc or torch version changed, unless `allow` accepts that (Manifest.problems lists them;
    the other compiled files do not change what trains, `stepc verify` reports them)."""
    try:
        manifest = load_manifest(path)
    except UserError as err:
        raise RuntimeFailure(f"{err}; recompile the spec with `stepc compile SPEC --force`") from None
    problems = manifest.problems(path.parent)
    versions = [p for p in problems if p.kind == "version"]
    for problem in problems:
        if problem.kind == "manifest" and "edited-manifest" not in allow:
            raise RuntimeFailure(
                f"{path} was edited after compilation (its content hash no longer matches). Recompile the spec with "
                f"`stepc compile SPEC --force` (checkpoints are kept), inspect with `stepc verify {path.parent}`, or "
                "pass --allow-edited-manifest to train with it anyway")
        if problem.kind == "file" and problem.name.endswith(".sh") and "edited-scripts" not in allow:
            raise RuntimeFailure(f"{problem.sentence_about(path.parent / problem.name)}; run `stepc verify {path.parent}` "
                                 "or pass --allow-edited-scripts")
    if versions and "version-change" not in allow:
        raise RuntimeFailure(f"this run was compiled with different versions ({', '.join(p.message for p in versions)}); "
                             "results may not match. Recompile with `stepc compile SPEC --force`, or pass "
                             "--allow-version-change")
    return manifest


def preflight(manifest_path: Path, stage_index: int, allow: set[str], data: bool = True,
              world: int | None = None, nnodes: int = 1) -> tuple[Manifest, bool]:
    """Every check that needs no torch: (verified manifest, stage already complete?).

    Raises RuntimeFailure (exit code 2). The stage scripts run this once before torchrun, because
    torchrun turns any worker's exit code into 1 and would hide the 2; the workers repeat it
    (with data=False: they compare the full data fingerprint themselves after loading the data).
    """
    manifest = load_verified_manifest(manifest_path, allow)
    if not 1 <= stage_index <= manifest.num_stages:
        raise RuntimeFailure(f"stage {stage_index} does not exist; this run has stages 1..{manifest.num_stages}")
    check_outputs(manifest_path.parent)  # before the first write (checkpoints/EXPERIMENT)
    if "edited-manifest" not in allow:  # who accepts an edited manifest accepts the checkpoints made before the edit
        check_experiment_identity(manifest_path.parent, manifest)
    if is_exported(RunDir(manifest_path.parent).final_export(stage_index)):
        return manifest, True
    if world is not None:
        check_world(manifest, world)
    check_multi_node(nnodes, os.environ.get("GLOO_SOCKET_IFNAME"), os.environ.get("RDZV_ENDPOINT"))
    from stepc.runtime.init_from import starting_export

    # refuses when stage i-1 (or [sft] init_from) has not finished or its export is damaged or changed
    # (the script's preflight hashes it; the ranks check sizes)
    starting_export(manifest_path.parent, manifest, stage_index, hashes=data)
    check_carry_source(manifest_path.parent, manifest, stage_index)
    if data and manifest.spec.method.objective == "instructions":
        from stepc.runtime.data.instructions import check_prepared

        check_prepared(manifest_path.parent, manifest.spec, manifest.plan)
    elif data:
        check_data_files(manifest_path.parent, manifest.spec.data, allow)
    if data:
        from stepc.runtime.loop.tracking import check_targets  # once, in the stage script's preflight, not per rank

        check_targets(manifest_path.parent, manifest.spec.log, str(manifest_path))
    return manifest, False


def check_outputs(run_dir: Path) -> None:
    """What the stage writes into is what it must be, or absent: a directory (a symlink to one is fine:
    checkpoints on another disk) or a regular file. A symlink loop, a dangling symlink or a file where a
    directory goes would otherwise fail deep inside the ranks with a traceback each."""
    paths = RunDir(run_dir)
    for path, want in ((paths.checkpoints, "a directory"), (paths.logs, "a directory"), (paths.export, "a directory"),
                       (paths.metrics, "a regular file")):
        if not os.path.lexists(path):
            continue
        try:
            info = os.stat(path)
        except OSError as exc:
            what = ("a symbolic link loop" if exc.errno == errno.ELOOP else
                    f"a symbolic link to {os.readlink(path)!r}, which does not exist" if exc.errno == errno.ENOENT else
                    f"unreadable ({exc.strerror})")
            raise UserError(f"{path.name} is {what}", file=str(path),
                            fix=f"remove {path} or point it at {want} "
                                "(a symlink to a directory on another disk is fine)") from None
        ok = stat.S_ISDIR(info.st_mode) if want == "a directory" else stat.S_ISREG(info.st_mode)
        if not ok:
            raise UserError(f"{path.name} is not {want}", file=str(path), fix=f"move {path} away; the stage creates it")


def check_carry_source(run_dir: Path, manifest: Manifest, stage_index: int) -> None:
    """step.carry_optimizer_state: a stage that has no checkpoint of its own starts from stage i-1's
    AdamW state, so stage i-1's checkpoint at its final step must be there (the workers then load and
    verify it; here only its COMPLETE marker is looked at, without torch)."""
    if not manifest.spec.step.carry_optimizer_state or stage_index == 1:
        return
    rundir = RunDir(run_dir)
    if any((p / CHECKPOINT_MARKER).is_file() for p in rundir.stage_dir(stage_index).glob("step-*")):
        return  # resumes from its own checkpoint; the carry happened when it started
    steps = manifest.plan.stages[stage_index - 2].steps
    source = rundir.step_checkpoint(stage_index - 1, steps)
    if not (source / CHECKPOINT_MARKER).is_file():
        raise carry_source_missing(rundir, stage_index, source)


def carry_source_missing(rundir: RunDir, stage_index: int, source: Path) -> RuntimeFailure:
    return RuntimeFailure(f"step.carry_optimizer_state needs stage {stage_index - 1}'s checkpoint at its final step "
                          f"{source}, which is missing or incomplete; rerun stage-{stage_index - 1}.sh after removing "
                          f"{rundir.final_export(stage_index - 1)} so it writes it")


def check_world(manifest: Manifest, world: int) -> None:
    """A stage may run (and resume) on any number of ranks whose micro-batches tile the global batch:
    the samples of a step depend only on the step and the global batch (data.BlockSampler), and DCP
    reshards the checkpoint. Refuse only where the tiling is impossible."""
    train, seq = manifest.spec.train, manifest.spec.model.seq_len
    per_pass = seq * train.micro_batch_size * world
    if world < 1 or train.global_batch_tokens % per_pass:
        raise RuntimeFailure(
            f"cannot run on {world} rank(s): train.global_batch_tokens = {train.global_batch_tokens} is not a multiple "
            f"of model.seq_len x train.micro_batch_size x ranks = {seq} x {train.micro_batch_size} x {world} = {per_pass}. "
            f"Launch with a number of ranks that divides it (NNODES x NPROC_PER_NODE), or change the spec and recompile")


def experiment_identity(manifest: Manifest) -> str:
    """Hash of what is trained (normalised spec and plan), not of versions or script bytes."""
    return digest(canonical_json([manifest.raw["spec"], manifest.raw["plan"]]).encode())


def check_experiment_identity(run_dir: Path, manifest: Manifest) -> None:
    """Checkpoints belong to one experiment: `stepc compile --force` keeps them, so a recompile that
    changed the spec or the plan must not resume from (or grow out of) the old run's weights."""
    record = RunDir(run_dir).experiment_record
    identity = experiment_identity(manifest)
    if not record.exists():
        atomic_write_text(record, identity + "\n")
        return
    recorded = record.read_text().strip()
    if recorded != identity:
        raise RuntimeFailure(
            f"the checkpoints in {record.parent} were trained for a different spec or plan than manifest.json "
            f"describes ({recorded[:19]} vs {identity[:19]}): `stepc compile --force` keeps training outputs. "
            f"Move {record.parent} aside to start this experiment afresh, recompile the original spec to resume it, "
            "or pass --allow-edited-manifest to train this manifest on top of them")


def previous_stage_export(run_dir: Path, stage: int, hashes: bool = False) -> Path | None:
    """Stage i > 1 starts from stage i-1's merged export; refuse while it does not exist or differs from
    what its marker recorded. The preflight checks contents (`hashes`); the ranks, after it, check sizes."""
    if stage == 1:
        return None
    export = RunDir(run_dir).final_export(stage - 1)
    if not is_exported(export):
        raise RuntimeFailure(f"stage {stage} needs stage {stage - 1} to finish first ({export} is missing or incomplete); "
                             f"run stage-{stage - 1}.sh (it resumes where it stopped)")
    try:
        check_export(export, hashes)
    except ExportDamaged as exc:
        raise RuntimeFailure(f"stage {stage - 1}'s export, which stage {stage} grows from, is damaged: {exc}. Move {export} "
                             f"aside and rerun stage-{stage - 1}.sh: it re-exports from its last complete checkpoint") from None
    return export


def _recorded_fingerprint(path: Path) -> DataFingerprint:
    from stepc.runtime.data.index import read_fingerprint  # pydantic, numpy: no torch

    try:
        return read_fingerprint(path)
    except (OSError, ValueError) as exc:
        raise RuntimeFailure(f"cannot read the data fingerprint {path}: {str(exc).splitlines()[0]}; delete it to record "
                             "the data afresh, or pass --allow-data-change") from None


def check_data_files(run_dir: Path, data: Data, allow: set[str]) -> None:
    """Preflight half of check_data_fingerprint: the data files (paths, sizes, contents) recorded by an
    earlier stage or attempt must still be there unchanged. Runs after `stepc data prepare`, so it compares
    the recorded fingerprint with the fresh data index (sha256s computed there, no hashing here)."""
    path = RunDir(run_dir).data_fingerprint
    if "data-change" in allow or not path.exists():
        return
    recorded = _recorded_fingerprint(path)
    from stepc.runtime.data.index import file_ids, read_index

    index = read_index(run_dir)
    if index is None:
        raise RuntimeFailure(f"{run_dir} has no prepared data (data-index.json); run `stepc data prepare {run_dir}`")
    before_all, now_all = recorded.files(), file_ids(index, blend=bool(data.sources))
    changed: list[str] = [f"{name}: the dataset is new" for name in sorted(set(now_all) - set(before_all))]
    changed += [f"{name}: the dataset is gone" for name in sorted(set(before_all) - set(now_all))]
    for name in sorted(set(before_all) & set(now_all)):
        before = {e.path: e for e in before_all[name]}
        now = {e.path: e for e in now_all[name]}
        changed += [f"{name}: {gone} is gone" for gone in sorted(set(before) - set(now))]
        changed += [f"{name}: {new} is new" for new in sorted(set(now) - set(before))]
        for file in sorted(set(before) & set(now)):
            if now[file].size != before[file].size:
                changed.append(f"{name}: {file} changed size ({before[file].size} -> {now[file].size} bytes)")
            elif now[file].sha256 != before[file].sha256:
                changed.append(f"{name}: {file} changed content (sha256)")
    if changed:
        more = f"; and {len(changed) - 5} more" if len(changed) > 5 else ""
        raise RuntimeFailure(f"the data differs from what this run read before (data fingerprint mismatch: "
                             f"{'; '.join(changed[:5])}{more}; recorded in {path}). Restore the original files, "
                             "or pass --allow-data-change to continue on the new data")


def check_data_fingerprint(run_dir: Path, fingerprint: DataFingerprint, rank: int, allow: set[str]) -> None:
    """The first stage records the data it read; later stages and resumes must read the same.

    The workers' half of the check (the preflight's check_data_files compares the files): the whole
    fingerprint, which also holds what only opening the data gives, the blocks the token stream is cut
    into (seq_len, num_blocks), the shards' and the tokenizer's hashes and a blend's weights. It fires
    after a passing preflight when those change and the files do not: e.g. model.seq_len edited in the
    manifest with --allow-edited-manifest (tests/test_reliability.py), or a re-preparation between the
    preflight and the workers."""
    path = RunDir(run_dir).data_fingerprint
    if path.exists():
        recorded = _recorded_fingerprint(path)
        changed = recorded.changes(fingerprint)
        if changed and "data-change" not in allow:
            raise RuntimeFailure(f"the data differs from what this run read before (data fingerprint mismatch: "
                                 f"{'; '.join(changed)}; recorded in {path}). "
                                 "Restore the original files, or pass --allow-data-change to continue on the new data")
        return
    if rank == 0:
        atomic_write_json(path, fingerprint.to_json())
