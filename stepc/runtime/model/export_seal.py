"""The completion marker of a stage export: every file's size and sha256, checked before anyone trusts it.

A stage grows from the previous stage's export, and `stepc eval` scores the last one. A marker that
said only "ok" let a truncated or bit-flipped safetensors file train into NaN (with advice to lower
the LR); now the marker lists each file, and `check_export` names the first one that differs.
Torch-free, so the stage preflight can run it before torchrun starts.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

from stepc.rundir import EXPORT_MARKER as MARKER
from stepc.atomic import atomic_write_json
from stepc.hashing import file_sha256_hex

FORMAT = 1


class ExportDamaged(Exception):
    """An export exists but is not what its marker recorded (or has no usable marker)."""


def seal(directory: Path) -> None:
    """Write the marker listing every regular file in `directory` (written last, so its presence means complete)."""
    files = {p.name: {"size": p.stat().st_size, "sha256": file_sha256_hex(p)}
             for p in sorted(directory.iterdir()) if p.is_file() and p.name != MARKER}
    atomic_write_json(directory / MARKER, {"format": FORMAT, "files": files})


def check(directory: Path, hashes: bool = True) -> None:
    """Raise ExportDamaged naming the first file that is missing, of another size or (with `hashes`) content."""
    marker = directory / MARKER
    try:
        text = marker.read_text(encoding="utf-8")
        record = {} if text.strip() == "ok" else json.loads(text)  # "ok": the marker of stepc before file hashes
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ExportDamaged(f"{marker} is unreadable or not the file list stepc writes ({exc.__class__.__name__})") from None
    files = record.get("files") if isinstance(record, dict) else None
    if not isinstance(files, dict) or not files:
        raise ExportDamaged(f"{marker} lists no files (an export written by an older stepc, or edited), so the export "
                            "cannot be checked")
    for name, entry in sorted(files.items()):
        path = directory / name
        if "/" in name or name in ("", ".", "..") or not isinstance(entry, dict):
            raise ExportDamaged(f"{marker} has a malformed entry {name!r}")
        try:
            info = os.lstat(path)
        except OSError:
            raise ExportDamaged(f"{path} is missing") from None
        if not stat.S_ISREG(info.st_mode):
            raise ExportDamaged(f"{path} is not a regular file")
        if info.st_size != entry.get("size"):
            raise ExportDamaged(f"{path} is {info.st_size} bytes, but the export recorded {entry.get('size')}")
        if hashes and file_sha256_hex(path) != entry.get("sha256"):
            raise ExportDamaged(f"{path} has different content (sha256) than the export recorded")
