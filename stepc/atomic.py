"""Atomic writes: every file stepc or its runtime writes into a run directory (or a cache shared by
runs) goes through `atomic_write_*`: a unique temporary name in the same directory, fsync, then
`os.replace`, so a crash or a concurrent writer never leaves a half-written file under the final name;
and the temporaries a killed writer left behind are recognised and removed. Standard library only."""

from __future__ import annotations

import json
import os
import re
import socket
import tempfile
from pathlib import Path
from typing import IO, Any, Callable


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
