"""A run directory: where each of its files is (every path inside one is a property of `RunDir`, so
the layout is written down once), and what in it may be trusted (a compiled file is a regular file
inside the directory, never a link; a manifest entry names such a file and a sha256).

Writing is stepc.atomic's job, hashing stepc.hashing's, reading the manifest stepc.schema.manifest's.
Standard library only: the stage scripts' preflight imports it and must start in well under a
second, without torch.
"""

from __future__ import annotations

import json
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from stepc.errors import UserError

MANIFEST = "manifest.json"
SWEEP_FILE = "sweep.json"  # what makes a directory a sweep directory (stepc/commands/sweep.py)


# --- paths ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RunDir:
    """The layout of `runs/<name>/` (see the README's "run directory" section)."""

    root: Path

    @property
    def manifest(self) -> Path:
        return self.root / MANIFEST

    @property
    def spec(self) -> Path:
        return self.root / "spec.toml"

    def stage_script(self, index: int) -> Path:
        return self.root / f"stage-{index}.sh"

    @property
    def lock(self) -> Path:
        """Who is training this run directory (stepc/runlock.py): one launch at a time."""
        return self.root / "LOCK"

    def stop_record(self, index: int) -> Path:
        """STOPPED: stage `index` was stopped by a signal after checkpointing (runtime/loop/preempt.py)."""
        return self.stage_dir(index) / "STOPPED"

    def failure_record(self, index: int) -> Path:
        """FAILED: a rank of stage `index` stopped with a diagnosis (OOM, non-finite loss, disk full);
        the stage script exits 2 when it is there (torchrun would turn the worker's 2 into 1)."""
        return self.stage_dir(index) / "FAILED"

    def stop_request(self, index: int) -> Path:
        """STOP_REQUEST: stage-<index>.sh was signalled; rank 0 checks for it after every step."""
        return self.stage_dir(index) / "STOP_REQUEST"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    def stage_dir(self, index: int) -> Path:
        """DCP step checkpoints of stage `index` (`step-<n>/`) and its merged export (`final/`)."""
        return self.checkpoints / f"stage-{index}"

    def step_checkpoint(self, index: int, step: int) -> Path:
        """The checkpoint of stage `index` after `step` optimizer steps (runtime/loop/checkpoint.py writes it)."""
        return self.stage_dir(index) / step_dir_name(step)

    def final_export(self, index: int) -> Path:
        """Stage `index`'s merged Hugging Face export: the next stage grows from it."""
        return self.stage_dir(index) / "final"

    @property
    def export(self) -> Path:
        """The last stage's export: the trained model."""
        return self.root / "export"

    @property
    def experiment_record(self) -> Path:
        """Which experiment (spec + plan identity) the checkpoints belong to."""
        return self.checkpoints / "EXPERIMENT"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def data_index(self) -> Path:
        """Written by `stepc data prepare RUN_DIR`: per dataset, its files and their token shards in the cache."""
        return self.root / "data-index.json"

    @property
    def data_fingerprint(self) -> Path:
        return self.root / "data-fingerprint.json"

    @property
    def eval_result(self) -> Path:
        return self.root / "eval.json"

    @property
    def tracking(self) -> Path:
        """The experiment trackers' run ids (one tracked run per run directory)."""
        return self.root / "tracking.json"

    @property
    def tensorboard(self) -> Path:
        return self.root / "tensorboard"

    @property
    def wandb(self) -> Path:
        """W&B's own directory (wandb.init(dir=RUN_DIR) writes RUN_DIR/wandb/<mode>-run-<time>-<id>)."""
        return self.root / "wandb"

    @property
    def mlflow_db(self) -> Path:
        """The default MLflow store: an SQLite database (`mlflow ui --backend-store-uri sqlite:///...` serves it)."""
        return self.root / "mlflow.db"

    @property
    def mlflow_artifacts(self) -> Path:
        """The artifacts of runs tracked to a database store (MLflow would put them under the working directory)."""
        return self.root / "mlartifacts"


# --- checkpoints and exports ---------------------------------------------------------------------

def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


CHECKPOINT_MARKER = "COMPLETE"  # written last into a checkpoint directory, listing its files
# written last into an export, listing its files' sizes and sha256s (runtime/model/export_seal.py)
EXPORT_MARKER = "EXPORT_COMPLETE"


# --- manifests -----------------------------------------------------------------------------------

def manifest_path(path: str | Path) -> Path:
    """A run directory or its manifest.json -> the manifest file."""
    path = Path(path)
    return path / MANIFEST if path.is_dir() else path


def sweep_dir_error(sweep_dir: Path) -> UserError:
    """A sweep directory given where one run directory is needed: say so and name its runs."""
    try:
        names = [p["name"] for p in json.loads((sweep_dir / SWEEP_FILE).read_bytes())["points"]]
    except (OSError, ValueError, KeyError, TypeError):
        names = []
    shown = ", ".join(str(n) for n in names[:3]) + (", ..." if len(names) > 3 else "")
    example = sweep_dir.parent / str(names[0]) if names else sweep_dir.parent / "<point>"
    return UserError(f"this is a sweep directory ({len(names)} runs{': ' + shown if names else ''}), not a run directory",
                     file=str(sweep_dir),
                     fix=f"give one of its run directories (siblings of it), e.g. {example}; `stepc run` (all points "
                         f"locally), `stepc submit` and `stepc report` take the sweep directory itself")


# --- what may be trusted in a run directory ------------------------------------------------------

_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")


def read_regular_file(path: Path, what: str, fix: str, max_bytes: int) -> bytes:
    """The bytes of `path`, refusing anything but a regular file of at most `max_bytes` (a UserError naming
    it): a FIFO or a device would block or never end, a directory cannot be read. Symlinks are followed
    (the user named the path); links inside a run directory are judged by `entry_problem`."""
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
        raise UserError(f"the {what} is {info.st_size} bytes, more than a {what} can be ({max_bytes})", file=str(path), fix=fix)
    try:
        return path.read_bytes()
    except OSError as exc:
        raise UserError(f"cannot read the {what}: {exc.strerror}", file=str(path), fix=fix) from None


def files_entry_problem(name: Any, recorded: Any) -> str | None:
    """Why a manifest `files` entry cannot name a compiled file of its run directory, or None."""
    if not isinstance(recorded, str) or not _DIGEST.fullmatch(recorded):
        shown = json.dumps(recorded)[:40] if not isinstance(recorded, (dict, list)) else type(recorded).__name__
        return f"the recorded hash of {name!r} is {shown}, not \"sha256:<64 hex digits>\""
    parts = PurePosixPath(name).parts
    if not name or "\\" in name or "\x00" in name or PurePosixPath(name).is_absolute() or ".." in parts:
        return f"{name!r} points outside the run directory (a compiled file is a plain name inside it)"
    return None


def entry_problem(run_dir: Path, name: str) -> str | None:
    """Why run_dir/name cannot be read as a compiled file (missing, a symlink, a directory, a FIFO...), or None.
    Links are never followed: a compiled file is never one, and following it could read outside the run."""
    path = run_dir / name
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return f"{name}: missing"
    except OSError as exc:
        return f"{name}: cannot be read ({exc.strerror})"
    if stat.S_ISLNK(info.st_mode):
        return (f"{name}: is a symbolic link (to {os.readlink(path)!r}); a compiled file is never a link, "
                "and verify does not follow one")
    if stat.S_ISDIR(info.st_mode):
        return f"{name}: is a directory, not the compiled file"
    if not stat.S_ISREG(info.st_mode):
        return f"{name}: is not a regular file (a pipe, socket or device)"
    real, root = os.path.realpath(path), os.path.realpath(run_dir)
    if os.path.commonpath([real, root]) != root:
        return f"{name}: resolves outside the run directory ({real})"
    return None


def export_seal_files(export: Path) -> dict[str, str] | None:
    """{file name: sha256 hex} as an export's seal (EXPORT_MARKER, runtime/model/export_seal.py) records
    them, or None when the seal is missing, unreadable or lists no files. Reads the record only: whether
    the files still match it is export_seal.check's job."""
    try:
        record = json.loads((export / EXPORT_MARKER).read_text(encoding="utf-8"))
        files = {name: entry["sha256"] for name, entry in record["files"].items()}
    except (OSError, UnicodeDecodeError, ValueError, TypeError, KeyError, AttributeError):
        return None
    return files if files and all(isinstance(v, str) for v in files.values()) else None
