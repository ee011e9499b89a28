"""Content hashes, in one place: sha256 of bytes and of files (streamed), the "sha256:<hex>" form the
manifest records, canonical JSON (one byte sequence per value) and the manifest's self-hash over it.
Standard library only (the stage scripts' preflight imports it)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any


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
