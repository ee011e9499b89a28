"""The one home of run-directory I/O: paths, atomic writes, file hashing, canonical JSON, manifests.

Every file stepc or its runtime writes into a run directory (or a cache shared by runs) goes
through `atomic_write_*`: a unique temporary name in the same directory, fsync, then `os.replace`,
so a crash or a concurrent writer never leaves a half-written file under the final name. Every
path inside a run directory is a property of `RunDir`, so the layout is written down once.

This module imports only the standard library: the stage scripts' preflight imports it and must
start in well under a second, without torch.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Any, Callable

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


# --- hashing -------------------------------------------------------------------------------------

def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


CHECKPOINT_MARKER = "COMPLETE"  # written last into a checkpoint directory, listing its files
EXPORT_MARKER = "EXPORT_COMPLETE"  # written last into an export, listing its files' sizes and sha256s (runtime/model/export_seal.py)


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def digest(data: bytes) -> str:
    """The manifest's form of a content hash: "sha256:<hex>"."""
    return "sha256:" + sha256_hex(data)


def file_sha256_hex(path: Path, chunk: int = 1 << 20) -> str:
    """sha256 of a file, streamed (data files can be gigabytes)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def canonical_json(obj: Any) -> str:
    """One byte sequence per value: sorted keys, no whitespace, UTF-8 kept as is."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def content_hash(manifest: dict[str, Any]) -> str:
    """The manifest's self-hash: over its canonical JSON without the "hash" key."""
    body = {k: v for k, v in manifest.items() if k != "hash"}
    return digest(canonical_json(body).encode())


# --- atomic writes -------------------------------------------------------------------------------

_HOST = socket.gethostname()
_TEMPORARY = re.compile(r"\.(?P<name>[^~/]+)~(?P<host>[^~/]+)~(?P<pid>[0-9]+)~[^~/]*\.tmp")
_OLD_SHARD_TEMPORARY = re.compile(r"\.[0-9]+\.(?P<pid>[0-9]+)\.tmp")  # stepc <= 0.3's shard temporaries


def temporary_prefix(path: Path) -> str:
    """The start of a temporary file's name for writing `path`: `.NAME~HOST~PID~`, so that a later run can
    tell a writer that was killed (this host, its PID gone) from one still writing, also on another
    node sharing the directory (`remove_orphaned_temporaries`)."""
    return f".{path.name}~{_HOST}~{os.getpid()}~"


def remove_orphaned_temporaries(directory: Path) -> list[Path]:
    """Delete the temporary files in `directory` whose writer was a process of this host that is gone
    (a killed `stepc data prepare` leaves them); a live writer's, and another host's, are kept. The
    removed paths."""
    removed = []
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return removed
    for entry in entries:
        match = _TEMPORARY.fullmatch(entry.name)
        if match is not None and match["host"] != _HOST:
            continue
        match = match or _OLD_SHARD_TEMPORARY.fullmatch(entry.name)
        if match is None or _pid_alive(int(match["pid"])):
            continue
        try:
            os.unlink(entry.path)
            removed.append(Path(entry.path))
        except FileNotFoundError:
            pass
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # an exited child its parent has not reaped yet writes nothing more
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return True


def atomic_write(path: Path, write: Callable[[IO[bytes]], Any], mode: int = 0o644) -> None:
    """Call `write(fh)` on a unique temporary file beside `path`, fsync, chmod, then rename it into place.

    The unique name lets concurrent writers (ranks, runs sharing a cache) race safely: the last
    rename wins and every reader sees one whole file. It starts with `temporary_prefix`.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=temporary_prefix(path), suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)  # mkstemp creates 0600; other users and ranks must read it
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: Path, data: bytes, mode: int = 0o644) -> None:
    atomic_write(path, lambda fh: fh.write(data), mode)


def atomic_write_text(path: Path, text: str, mode: int = 0o644) -> None:
    atomic_write_bytes(path, text.encode("utf-8"), mode)


def atomic_write_json(path: Path, obj: Any) -> None:
    """Indented, sorted JSON for people (records such as eval.json and data-fingerprint.json)."""
    atomic_write_text(path, json.dumps(obj, indent=1, sort_keys=True) + "\n")


# --- manifests -----------------------------------------------------------------------------------

def manifest_path(path: str | Path) -> Path:
    """A run directory or its manifest.json -> the manifest file."""
    path = Path(path)
    return path / MANIFEST if path.is_dir() else path


MAX_MANIFEST_BYTES = 64 << 20
MANIFEST_KEYS = ("schema", "stepc_version", "spec", "plan", "environment", "files", "hash")
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The JSON of a manifest, from a run directory or the file itself; a UserError naming the file when it is
    not a regular file, not JSON, or not a manifest at all (`[]`, a string, an object without its keys)."""
    path = manifest_path(path)
    fix = "pass a run directory made by `stepc compile` or its manifest.json"
    if not path.exists() and (path.parent / SWEEP_FILE).is_file():
        raise sweep_dir_error(path.parent)
    data = read_regular_file(path, "manifest", fix, MAX_MANIFEST_BYTES)
    try:
        obj = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise UserError(f"not a readable manifest: {exc}", file=str(path), fix=fix) from None
    fix = "pass a manifest.json written by `stepc compile` (recompile the spec to get a fresh one)"
    if not isinstance(obj, dict):
        kind = "null" if obj is None else type(obj).__name__
        raise UserError(f"not a manifest: the JSON is {kind}, not an object", file=str(path), fix=fix)
    missing = [k for k in MANIFEST_KEYS if k not in obj]
    if missing:
        raise UserError(f"not a manifest: no {', '.join(missing)} (a manifest has {', '.join(MANIFEST_KEYS)})",
                        file=str(path), fix=fix)
    for key in ("spec", "plan", "environment", "files"):
        if not isinstance(obj[key], dict):
            raise UserError(f"{key} is {type(obj[key]).__name__}, not an object", file=str(path), key=key, fix=fix)
    return obj


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
                     fix=f"give one of its run directories (siblings of it), e.g. {example}; `stepc submit` and "
                         f"`stepc report` take the sweep directory itself")


# --- what may be trusted in a run directory ------------------------------------------------------

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
        return f"{name}: is a symbolic link (to {os.readlink(path)!r}); a compiled file is never a link, and verify does not follow one"
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
