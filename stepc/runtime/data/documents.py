"""Reading training documents: globs to files, files to units of work, units to streamed text.

A *unit* is a piece of one file that one worker tokenises on its own: a range of parquet row
groups, a byte range of a jsonl file (cut at line starts), or a whole txt file. Units depend only
on the file's bytes, so the worker count never changes them, and each holds a bounded amount of
text in memory at a time (one row-group batch, a few MB of lines, or one txt chunk).

Every reader yields *pieces* ``(text, ends_document)``: parquet and jsonl pieces are whole documents; a
large txt file (one document), and any document longer than TXT_CHUNK_BYTES, arrives in pieces cut where
the byte-level BPE pre-tokenizer would split anyway (see `_CUT`), so cut and whole encoding give the same
ids and memory stays bounded however long a line is. Every bad input is a :class:`stepc.errors.UserError`
naming the file, the byte offset where it helps, and the fix. Hand-written because no library streams
these three formats with that error reporting.
"""

from __future__ import annotations

import codecs
import glob
import json
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from stepc.errors import UserError
from stepc.schema.rules import DATA_SUFFIXES

SUFFIXES = DATA_SUFFIXES  # one list for the compiler and the runtime (stepc/schema/rules.py)
TARGET_UNIT_BYTES = 64 << 20  # text per unit: ~20M GPT-2 tokens, 40 MB of uint16 shard
BATCH_DOCUMENTS = 1024  # documents per encode_batch call: bounds memory, keeps Rust busy
BATCH_BYTES = 8 << 20
MAX_ENCODE_CHARS = 1 << 20
"""The most text one encode call gets: a batch over it is split, a longer document cut (where the tokenizer
allows, see `_CUT`). The tokenizer holds ~120 bytes per character while it encodes (gpt2: 500 MB for one
4 MB line), so this keeps a worker within a few hundred MB whatever the documents' sizes."""
TXT_CHUNK_BYTES = MAX_ENCODE_CHARS

Piece = tuple[str, bool]  # (text, this piece ends a document)


@dataclass(frozen=True)
class Unit:
    """One worker's share of a file: row groups [start, stop) of a parquet file, bytes
    [start, stop) of a jsonl file, or a whole txt file (start = stop = 0)."""

    start: int
    stop: int


def _fail(path: Path | str, message: str, fix: str) -> UserError:
    return UserError(message, file=str(path), fix=fix)


def expand_patterns(patterns: Sequence[str | os.PathLike[str]], key: str = "data.train") -> list[Path]:
    """Expand globs (``**`` allowed) in order; each pattern's matches sorted; duplicates dropped.

    Relative patterns resolve against the CWD and stay relative (paths "as given"), so a
    fingerprint does not depend on where the repository is checked out.
    """
    files: list[Path] = []
    seen: set[Path] = set()
    for pattern in patterns:
        matches = sorted(p for p in glob.glob(os.fspath(pattern), recursive=True) if os.path.isfile(p))
        if not matches:
            raise UserError(f"the data pattern {os.fspath(pattern)!r} matches no file (relative to {os.getcwd()})",
                            file=os.fspath(pattern), key=key,
                            fix="correct the path or glob, or launch from the directory the spec's data paths "
                                "are relative to (the project root)")
        for match in map(Path, matches):
            if match.suffix not in SUFFIXES:
                raise _fail(match, f"unsupported data file type {match.suffix!r}",
                            f"use {', '.join(SUFFIXES)} files, or narrow the glob in [{key}] so it matches only those")
            if match.resolve() not in seen:
                seen.add(match.resolve())
                files.append(match)
    return files


def check_readable(path: Path) -> int:
    """Size of a readable, non-empty data file; a UserError otherwise."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            fh.read(1)
    except OSError as exc:
        raise _fail(path, f"cannot read this data file ({exc.strerror or exc})",
                    "fix its permissions or remove it from the data globs") from None
    if size == 0:
        raise _fail(path, "this data file is empty", "remove it or narrow the data glob")
    return size


def plan_units(path: Path, text_field: str) -> list[Unit]:
    """The file's units, a pure function of its bytes (and the column for parquet)."""
    if path.suffix == ".parquet":
        meta = _parquet_file(path, text_field).metadata
        units, start, size = [], 0, 0
        for rg in range(meta.num_row_groups):
            size += meta.row_group(rg).total_byte_size
            if size >= TARGET_UNIT_BYTES:
                units.append(Unit(start, rg + 1))
                start, size = rg + 1, 0
        if start < meta.num_row_groups or not units:
            units.append(Unit(start, meta.num_row_groups))
        return units
    if path.suffix == ".jsonl":
        total = path.stat().st_size
        cuts = [0]
        with open(path, "rb") as fh:
            while cuts[-1] + TARGET_UNIT_BYTES < total:
                fh.seek(cuts[-1] + TARGET_UNIT_BYTES)
                fh.readline()  # to the start of the next line
                if fh.tell() >= total:
                    break
                cuts.append(fh.tell())
        return [Unit(a, b) for a, b in zip(cuts, cuts[1:] + [total])]
    return [Unit(0, 0)]


def read_unit(path: Path, unit: Unit, text_field: str, txt_chunks: bool) -> Iterator[list[Piece]]:
    """Batches of pieces of one unit (see the module docstring). Empty and null documents are
    skipped: they would only add stray EOS tokens. No batch holds more than MAX_ENCODE_CHARS characters;
    with `txt_chunks` (the tokenizer gives the same ids for a text cut at `_CUT`) a txt file is read in
    chunks and a longer document of any format is cut into pieces: a 30 MB single-line document took
    gigabytes in one encode."""
    if path.suffix == ".parquet":
        batches = _read_parquet(path, unit, text_field)
    elif path.suffix == ".jsonl":
        batches = _read_jsonl(path, unit, text_field)
    elif path.suffix == ".txt":
        batches = _read_txt(path, TXT_CHUNK_BYTES if txt_chunks else None)
    else:
        raise _fail(path, f"unsupported data file type {path.suffix!r}", f"use {', '.join(SUFFIXES)} files")
    yield from _bounded(batches, MAX_ENCODE_CHARS, txt_chunks)


def _bounded(batches: Iterator[list[Piece]], limit: int, cut: bool) -> Iterator[list[Piece]]:
    """The same text in the same order in batches of at most `limit` characters; with `cut`, a longer
    document is cut (`cut_document`) into pieces, else it stays one batch of its own. The ids do not
    change: every piece is encoded on its own whatever batch it is in."""
    for batch in batches:
        if sum(len(text) for text, _ in batch) <= limit:
            yield batch
            continue
        out: list[Piece] = []
        size = 0
        for text, ends in batch:
            for piece in cut_document(text, ends, limit) if cut and len(text) > limit else [(text, ends)]:
                if out and size + len(piece[0]) > limit:
                    yield out
                    out, size = [], 0
                out.append(piece)
                size += len(piece[0])
        if out:
            yield out


def iter_documents(path: Path, text_field: str) -> Iterator[str]:
    """Whole documents of a file, in order (for tokenizer training; a txt file is one document)."""
    for unit in plan_units(path, text_field):
        for batch in read_unit(path, unit, text_field, txt_chunks=False):
            yield from (text for text, _ in batch)


# ------------------------------------------------------------------------------- parquet

def _parquet_file(path: Path, text_field: str):
    import pyarrow as pa  # imported lazily: only parquet users pay for pyarrow
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as exc:
        raise _fail(path, f"not a readable parquet file ({exc})", "rewrite or remove the file") from None
    schema = pf.schema_arrow
    if text_field not in schema.names:
        raise UserError(f"no column {text_field!r} (columns: {', '.join(schema.names)})", file=str(path),
                        key="data.text_field", fix="set [data] text_field to the column that holds the text")
    kind = schema.field(text_field).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise UserError(f"column {text_field!r} holds {kind}, not text", file=str(path), key="data.text_field",
                        fix="point [data] text_field at a string column")
    return pf


def _read_parquet(path: Path, unit: Unit, text_field: str) -> Iterator[list[Piece]]:
    pf = _parquet_file(path, text_field)
    for batch in pf.iter_batches(batch_size=BATCH_DOCUMENTS, row_groups=range(unit.start, unit.stop),
                                 columns=[text_field], use_threads=False):
        pieces = [(doc, True) for doc in batch.column(0).to_pylist() if doc]
        if pieces:
            yield pieces


# --------------------------------------------------------------------------------- jsonl

def _read_jsonl(path: Path, unit: Unit, text_field: str) -> Iterator[list[Piece]]:
    batch: list[Piece] = []
    size = 0
    with open(path, "rb") as fh:
        fh.seek(unit.start)
        offset = unit.start
        while offset < unit.stop:
            raw = fh.readline()
            if not raw:
                break
            at, offset = offset, offset + len(raw)
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise _fail(path, f"not UTF-8 text at byte offset {at + exc.start}",
                            "re-encode the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise _fail(path, f"the line at byte offset {at} is not JSON ({exc.msg})",
                            "make every line one JSON object (JSON Lines)") from None
            if not isinstance(record, dict) or text_field not in record:
                raise UserError(f"the line at byte offset {at} has no field {text_field!r}", file=str(path),
                                key="data.text_field", fix="set [data] text_field to the key that holds the text")
            doc = record[text_field]
            if doc is not None and not isinstance(doc, str):
                raise UserError(f"field {text_field!r} at byte offset {at} holds {type(doc).__name__}, not text",
                                file=str(path), key="data.text_field", fix="store the document text as a JSON string")
            if doc:
                batch.append((doc, True))
                size += len(raw)
            raw = line = record = None  # a long line held three times over while the batch is encoded
            if len(batch) >= BATCH_DOCUMENTS or size >= BATCH_BYTES:
                yield batch
                batch, size = [], 0
    if batch:
        yield batch


# ----------------------------------------------------------------------------------- txt

# Where byte-level BPE's pre-tokenizer (GPT-2's regex, `'s|'t|...| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+`)
# always ends a pre-token, whatever follows, and starts the next one exactly where encoding the rest on its own
# would: encoding the text cut there gives the ids of the whole (merges never cross a pre-token).
# 1. after a lone newline between word characters (or closing punctuation) and a word character;
# 2. before a space, tab or newline that follows a non-space character: no pattern takes a space after
#    a non-space character into the same pre-token (the optional space only opens one), and a run of
#    whitespace begins right there in the whole text as in the piece. Python's \S is a subset of the
#    Rust regex's non-space (Python also counts U+001C..U+001F as space), so the cut is never inside a
#    whitespace run. No cut falls inside an added token such as <|endoftext|> (txt_chunks_safe requires
#    added tokens without whitespace).
_CUT = re.compile(r"(?<=[\w.,;:!?'\")\]]\n)(?=\w)|(?<=\S)(?=[ \t\n])")
_WINDOW = 1 << 16


def last_cut(text: str, lo: int, hi: int) -> int:
    """The last cut point p with lo <= p < hi and p > 0 (see `_CUT`), or 0 when there is none; searched
    from the end in growing windows, so a text with cut points costs one small window."""
    lo, start, size = max(lo, 1), hi, _WINDOW
    while start > lo:
        start = max(lo, hi - size)
        last = 0
        for match in _CUT.finditer(text, start, hi):
            last = match.start()
        if last:
            return last
        size *= 4
    return 0


def cut_document(text: str, ends: bool, limit: int) -> Iterator[Piece]:
    """`text` as pieces of at most `limit` characters where a cut point allows (the last one before the
    limit, else the first one after it; one piece when there is none), the last piece ending the document
    when `ends`."""
    start = 0
    while len(text) - start > limit:
        cut = last_cut(text, start + 1, start + limit + 1)
        if not cut:
            match = _CUT.search(text, start + limit + 1)
            if match is None:
                break
            cut = match.start()
        yield text[start:cut], False
        start = cut
    yield text[start:], ends


def _read_txt(path: Path, chunk_bytes: int | None) -> Iterator[list[Piece]]:
    """The whole file as one document, decoded as UTF-8 (BOM dropped) with universal newlines
    (\\r\\n and \\r become \\n, so line endings never change token ids), in pieces cut at the last
    cut point of what has been read (`_CUT`) when `chunk_bytes` is given."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="strict")
    pending = ""  # normalised text not yet yielded; it holds no cut point before its last character
    held_cr = False  # a \r at the end of a read: it may be the first half of a \r\n
    consumed = 0  # bytes read so far; the decoder may hold back the start of a split character
    first = True
    with open(path, "rb") as fh:
        while True:
            raw = fh.read(chunk_bytes or -1)
            final = not raw or chunk_bytes is None
            held = len(decoder.getstate()[0])
            try:
                text = decoder.decode(raw, final=final)
            except UnicodeDecodeError as exc:
                raise _fail(path, f"not UTF-8 text at byte offset {consumed - held + exc.start}",
                            "re-encode the file as UTF-8") from None
            if first and text:
                text, first = text.removeprefix("\ufeff"), False  # a UTF-8 byte-order mark
            consumed += len(raw)
            text = ("\r" if held_cr else "") + text
            held_cr = not final and text.endswith("\r")
            if held_cr:
                text = text[:-1]
            searched = len(pending)  # only the new text (and the seam) can hold a new cut point
            pending += text.replace("\r\n", "\n").replace("\r", "\n")
            if final:
                if pending:
                    yield [(pending, True)]
                return
            cut = last_cut(pending, searched, len(pending))
            if cut:
                yield [(pending[:cut], False)]
                pending = pending[cut:]
