"""Data preparation: tokenise every data file once, in parallel, into the shard cache, and write
the run's data index. Runs before any training process (stage scripts, `stepc run`, run.sbatch),
so no collective ever waits on tokenisation.

- Streams: memory is one batch of documents per worker, whatever the corpus size.
- Parallel: units (see documents.py) go to ``workers`` processes; each unit's shard depends
  only on the unit and the tokenizer, so the output never depends on the worker count.
- Resumable: shards and their metadata are written atomically; a rerun skips finished units.
- Incremental and shared: shards are keyed by file content and tokenizer hash, so a new file is
  the only one tokenised and runs with the same files share the cache.
- Cheap when done: a file's sha256 is remembered under its (path, size, mtime, inode), so a
  rerun on prepared data stats files and reads a few small JSON files.

Hand-written on `tokenizers`' batch encoder and pyarrow rather than HF ``datasets.map``: that
keeps an Arrow copy of the text on disk and reached ~0.7x the throughput of this design on a 1 GB
parquet corpus, and neither it nor litdata keeps stepc 0.1's exact packing order.
"""

from __future__ import annotations

import errno
import hashlib
import json
import multiprocessing
import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from stepc.errors import UserError
from stepc.atomic import atomic_write_bytes, atomic_write_json, remove_orphaned_temporaries, temporary_prefix
from stepc.hashing import canonical_json, file_sha256_hex
from stepc.rundir import RunDir
from stepc.runtime.data.index import (CachedUnit, DataIndex, Dataset, FileEntry, FileShards, ShardRef, TokenizerRef,
                                     UnitMeta, read_json_record)
from stepc.runtime.data.prepared import current_index, dataset_key
from stepc.runtime.data.documents import Unit, check_readable, expand_patterns, iter_documents, plan_units, read_unit
from stepc.runtime.data.shards import SHARD_FORMAT, token_dtype
from stepc.runtime.data.tokenizer import BPE_SAMPLE_CHARS, eos_id, id_bound, load_tokenizer
from stepc.schema.spec import Data


@dataclass(frozen=True)
class DataFile:
    path: Path  # as given (relative to the launch directory when the pattern was)
    size: int
    mtime_ns: int
    sha256: str


def default_workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


# ----------------------------------------------------------------------------- file identity

def _stat_key(path: Path, st: os.stat_result) -> str:
    ident = f"{path.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ino}"
    return hashlib.sha256(ident.encode()).hexdigest()[:32]


def identify(path: Path, cache: Path, rehash: bool = False) -> DataFile:
    """Size, mtime and sha256 of a data file; the hash is reused from the cache while the file's
    path, size, mtime and inode are unchanged (``rehash`` forces a fresh one)."""
    check_readable(path)
    st = path.stat()
    record = cache / "hashes" / f"{_stat_key(path, st)}.json"
    digest = None
    if not rehash:
        try:
            digest = json.loads(record.read_bytes())["sha256"]
        except (OSError, ValueError, KeyError):
            digest = None
    if digest is None:
        digest = file_sha256_hex(path)
        if path.stat().st_mtime_ns != st.st_mtime_ns or path.stat().st_size != st.st_size:
            raise changed_error(path)
        atomic_write_json(record, {"sha256": digest})
    return DataFile(path, st.st_size, st.st_mtime_ns, digest)


class DataFileChanged(UserError):
    """A data file changed while it was hashed or tokenised: its shards (keyed by the old content)
    are removed and the user reruns once the writer is done."""


def changed_error(path: Path) -> DataFileChanged:
    return DataFileChanged("this data file changed while it was being prepared", file=str(path),
                           fix="wait until whatever writes it has finished, then rerun `stepc data prepare`")


# ------------------------------------------------------------------------------- tokenizer

def resolve_tokenizer(data: Data, train_files: list[DataFile], cache: Path) -> tuple[Tokenizer, str]:
    """The spec's tokenizer, also saved by content under ``cache/tokenizers`` for the training
    processes to load. bpe-N trains on every training document in order when they fit in
    BPE_SAMPLE_CHARS, else on whole units drawn in a fixed seeded order until that budget."""
    sampled = data.tokenizer.startswith("bpe-") and sum(f.size for f in train_files) > BPE_SAMPLE_CHARS

    def documents() -> Iterator[str]:
        if not sampled:
            for f in train_files:
                yield from iter_documents(f.path, data.text_field)
            return
        units = [(f.path, unit) for f in train_files for unit in plan_units(f.path, data.text_field)]
        random.Random(0).shuffle(units)
        for path, unit in units:
            for batch in read_unit(path, unit, data.text_field, txt_chunks=False):
                yield from (text for text, _ in batch)

    try:
        tok, digest = load_tokenizer(data.tokenizer, [f.sha256 for f in train_files], documents,
                                     cache / "tokenizers", data.text_field, sampled)
    except ValueError as exc:
        raise UserError(str(exc), key="data.tokenizer", fix="use one of the accepted forms") from None
    saved = cache / "tokenizers" / f"{digest}.json"
    if not saved.is_file():
        atomic_write_bytes(saved, tok.to_str().encode("utf-8"))
    try:
        eos_id(tok)
    except ValueError as exc:
        raise UserError(str(exc), key="data.tokenizer", fix="use a tokenizer with an end-of-document token") from None
    return tok, digest


def txt_chunks_safe(tok: Tokenizer) -> bool:
    """Whether a document may be encoded in pieces (cut at documents._CUT) with the same ids as a
    whole: true for byte-level BPE with GPT-2's regex, no normalizer and no added token holding
    whitespace (gpt2, bpe-N)."""
    conf = json.loads(tok.to_str())
    pre = conf.get("pre_tokenizer") or {}
    return (conf.get("normalizer") is None and pre.get("type") == "ByteLevel"
            and pre.get("use_regex", True) and not pre.get("add_prefix_space", False)
            and not any(any(ch.isspace() for ch in t.get("content", "")) for t in conf.get("added_tokens") or []))


# --------------------------------------------------------------------------------- workers

_TOKENIZER: Tokenizer | None = None


def _init_worker(tok_json: str) -> None:
    global _TOKENIZER
    os.environ["RAYON_NUM_THREADS"] = "1"  # one core per worker process; the pool is the parallelism
    _TOKENIZER = Tokenizer.from_str(tok_json)


@dataclass(frozen=True)
class Task:
    path: str
    unit: Unit
    text_field: str
    txt_chunks: bool
    out: str  # shard path without suffix
    dtype: str
    eos: int
    size: int
    mtime_ns: int


def encode_unit(task: Task) -> dict[str, Any]:
    """:func:`_encode_unit`, with a UserError (a full or read-only cache disk too) returned as its fields
    (it does not pickle)."""
    try:
        return _encode_unit(task)
    except UserError as err:
        return {"error": [err.message, err.file, err.key, err.fix], "changed": isinstance(err, DataFileChanged)}
    except OSError as exc:
        err = write_error(exc, Path(task.out).parent)
        return {"error": [err.message, err.file, err.key, err.fix]}


def write_error(exc: OSError, where: Path, run_dir: Path | None = None) -> UserError:
    """A failed write (or read of our own files) under the shard cache or the run directory, as the
    UserError that names the path and the fix: a full disk, a read-only one, missing permissions."""
    path = Path(exc.filename) if exc.filename else where
    if run_dir is not None and Path(os.path.abspath(path)).is_relative_to(os.path.abspath(run_dir)):
        return UserError(f"cannot write the run directory's data index: {exc.strerror}", file=str(path),
                         fix="make the run directory writable (or free space on its disk) and rerun `stepc data prepare`")
    if exc.errno == errno.ENOSPC:
        what, fix = "the disk holding the shard cache is full", "free space on it, or set data.cache_dir to a disk with room"
    else:
        what = f"cannot write the shard cache ({exc.strerror})"
        fix = "make it writable, or set data.cache_dir to a writable directory"
    return UserError(f"{what}: {path}", file=str(path), key="data.cache_dir",
                     fix=f"{fix}; rerun `stepc data prepare` (finished shards are kept)")


def _encode_unit(task: Task) -> dict[str, Any]:
    """Tokenise one unit into ``<out>.bin`` (flat ids, EOS after every document), then write
    ``<out>.json`` (tokens, documents, sha256 of the .bin); both atomically, metadata last."""
    assert _TOKENIZER is not None
    path, out = Path(task.path), Path(task.out)
    dtype = np.dtype(task.dtype)
    eos = np.array([task.eos], dtype=dtype)
    digest = hashlib.sha256()
    tokens = documents = 0
    tmp = out.with_name(f"{temporary_prefix(out)}.tmp")
    try:
        with open(tmp, "wb") as fh:
            for batch in read_unit(path, task.unit, task.text_field, task.txt_chunks):
                encodings = _TOKENIZER.encode_batch_fast([text for text, _ in batch], add_special_tokens=False)
                parts = []
                for enc, (_, ends) in zip(encodings, batch):
                    parts.append(np.asarray(enc.ids, dtype=dtype))
                    if ends:
                        parts.append(eos)
                        documents += 1
                buf = np.concatenate(parts) if parts else np.zeros(0, dtype)
                fh.write(buf.tobytes())
                digest.update(buf.tobytes())
                tokens += len(buf)
            fh.flush()
            os.fsync(fh.fileno())
        st = path.stat()
        if (st.st_size, st.st_mtime_ns) != (task.size, task.mtime_ns):
            raise changed_error(path)
        os.chmod(tmp, 0o644)
        os.replace(tmp, out.with_suffix(".bin"))
    finally:
        tmp.unlink(missing_ok=True)
    meta = UnitMeta(format=SHARD_FORMAT, start=task.unit.start, stop=task.unit.stop, tokens=tokens,
                    documents=documents, sha256=digest.hexdigest())
    atomic_write_json(out.with_suffix(".json"), meta.model_dump())
    return meta.model_dump()


def _run_tasks(tasks: list[Task], tok: Tokenizer, workers: int, progress: Callable[[str], None],
               on_unit: Callable[[int, int], None] | None) -> None:
    if not tasks:
        return
    started, done = time.monotonic(), 0
    if workers <= 1:
        _init_worker(tok.to_str())
        for meta in map(encode_unit, tasks):
            done = _report(meta, done, len(tasks), started, progress, on_unit)
        return
    # spawn: a forked child would inherit the parent's tokenizer thread pool in an unusable state.
    # concurrent.futures, not multiprocessing.Pool: a worker killed (e.g. out of memory) raises
    # BrokenProcessPool instead of hanging the preparation forever.
    with ProcessPoolExecutor(min(workers, len(tasks)), mp_context=multiprocessing.get_context("spawn"),
                             initializer=_init_worker, initargs=(tok.to_str(),)) as pool:
        futures = [pool.submit(encode_unit, task) for task in tasks]
        try:
            for future in as_completed(futures):
                done = _report(future.result(), done, len(tasks), started, progress, on_unit)
        except BrokenProcessPool:
            raise UserError("a tokeniser worker process died (out of memory?)", file=tasks[0].path,
                            fix="rerun `stepc data prepare` with fewer --workers; finished shards are kept") from None
        finally:
            for future in futures:
                future.cancel()


def _report(meta: dict[str, Any], done: int, total: int, started: float, progress: Callable[[str], None],
            on_unit: Callable[[int, int], None] | None) -> int:
    """A finished unit: `on_unit(done, total)` (a progress bar) when given, else one line through `progress`."""
    if "error" in meta:
        raise (DataFileChanged if meta.get("changed") else UserError)(*meta["error"])
    done += 1
    if on_unit is not None:
        on_unit(done, total)
    else:
        progress(f"  {done}/{total} units tokenised ({(time.monotonic() - started):.1f} s)")
    return done


# ----------------------------------------------------------------------------- preparation

def _file_dir(cache: Path, tok_hash: str, file: DataFile, text_field: str) -> Path:
    key = {"format": SHARD_FORMAT, "sha256": file.sha256, "suffix": file.path.suffix,
           "text_field": None if file.path.suffix == ".txt" else text_field}
    return cache / "shards" / tok_hash[:16] / hashlib.sha256(canonical_json(key).encode()).hexdigest()[:32]


def _file_index(directory: Path) -> FileShards | None:
    """A completely prepared file's cache index, or None unless every shard it lists is there at its size."""
    index = read_json_record(directory / "index.json", FileShards)
    if index is None:
        return None
    itemsize = np.dtype(index.dtype).itemsize
    for unit in index.units:
        try:
            if (directory / unit.shard).stat().st_size != unit.tokens * itemsize:
                return None
        except OSError:
            return None
    return index


def prepare(data: Data, cache: Path, run_dir: Path | None = None, workers: int | None = None,
            verify: bool = False, progress: Callable[[str], None] = lambda line: None,
            seq_len: int | None = None, on_unit: Callable[[int, int], None] | None = None) -> DataIndex:
    """Tokenise whatever is missing from the cache and return the data index (written to
    ``run_dir/data-index.json`` when a run directory is given). ``verify`` re-hashes every data
    file and every shard instead of trusting sizes and mtimes (a bad shard is tokenised again).
    With ``seq_len``, a dataset shorter than one block is an error. A write that fails (a full or
    read-only disk) is a UserError naming the path; a run directory that cannot take the index is
    found before any tokenising. ``on_unit(done, total)`` is called as each unit of tokenising finishes
    (a progress bar); without it each is a line through ``progress``."""
    cache = Path(cache)
    workers = workers or default_workers()
    if run_dir is not None and not verify:
        try:  # already prepared and nothing changed: a stat per file and shard, no tokenizer, no hashing
            return current_index(Path(run_dir), data)
        except UserError:
            pass
    if run_dir is not None:
        try:
            with tempfile.TemporaryFile(dir=run_dir):  # the index is written last: know now that it can be
                pass
        except OSError as exc:
            exc.filename = str(RunDir(run_dir).data_index)
            raise write_error(exc, cache, run_dir) from None
    try:
        return _prepare(data, cache, run_dir, workers, verify, progress, seq_len, on_unit)
    except OSError as exc:
        raise write_error(exc, cache, run_dir) from None


@dataclass
class _Datasets:
    """Each dataset's patterns and the files they matched, identified (sizes, mtimes, sha256s)."""
    patterns: dict[str, dict[str, list[str]]]  # kind ("train"/"validation") -> name -> globs
    files: dict[str, dict[str, list[DataFile]]]  # kind -> name -> files in stream order

    def all_files(self) -> Iterator[DataFile]:
        for by_name in self.files.values():
            for files in by_name.values():
                yield from files


def _identify_datasets(data: Data, cache: Path, rehash: bool) -> _Datasets:
    sets = _Datasets({"train": {}, "validation": {}}, {"train": {}, "validation": {}})
    sources = {("train", n): list(s.files) for n, s in data.training_sources().items()}
    sources.update({("validation", n): [p] for n, p in sorted(data.validation.items())})
    for (kind, name), globs in sources.items():
        sets.patterns[kind][name] = globs
        paths = expand_patterns(globs, dataset_key(data, kind, name))
        sets.files[kind][name] = [identify(p, cache, rehash) for p in paths]
    return sets


@dataclass(frozen=True)
class _Encoding:
    """How this preparation tokenises: the spec's tokenizer and what follows from it."""
    tok: Tokenizer
    tok_hash: str
    dtype: np.dtype
    eos: int
    txt_chunks: bool


def _plan_tasks(data: Data, cache: Path, enc: _Encoding, files: dict[Path, DataFile], verify: bool,
                progress: Callable[[str], None]) -> tuple[list[Task], dict[Path, tuple[DataFile, list[Unit]]]]:
    """The units still to tokenise, and the files (by cache directory) that are not completely
    prepared. A unit whose shard survives whole (and, with ``verify``, matches its sha256) is kept."""
    tasks: list[Task] = []
    pending: dict[Path, tuple[DataFile, list[Unit]]] = {}
    for directory, f in files.items():
        if _file_index(directory) is not None and not verify:
            continue
        units = plan_units(f.path, data.text_field)
        pending[directory] = (f, units)
        for i, unit in enumerate(units):
            meta, shard = directory / f"{i:05d}.json", directory / f"{i:05d}.bin"
            recorded = read_json_record(meta, UnitMeta)
            if recorded is not None and shard.is_file():  # finished earlier (perhaps by an interrupted run)
                whole = shard.stat().st_size == recorded.tokens * enc.dtype.itemsize  # a truncated shard is not finished
                if whole and (not verify or file_sha256_hex(shard) == recorded.sha256):
                    continue
                why = "does not match its recorded sha256" if whole else "is shorter or longer than its recorded tokens"
                progress(f"{shard} {why}: tokenising its unit again")
                (directory / "index.json").unlink(missing_ok=True)
                meta.unlink()
            tasks.append(Task(str(f.path), unit, data.text_field, enc.txt_chunks, str(directory / f"{i:05d}"),
                              enc.dtype.name, enc.eos, f.size, f.mtime_ns))
    return tasks, pending


def _prepare(data: Data, cache: Path, run_dir: Path | None, workers: int, verify: bool,
             progress: Callable[[str], None], seq_len: int | None,
             on_unit: Callable[[int, int], None] | None = None) -> DataIndex:
    sets = _identify_datasets(data, cache, verify)
    tok, tok_hash = resolve_tokenizer(data, [f for files in sets.files["train"].values() for f in files], cache)
    enc = _Encoding(tok, tok_hash, token_dtype(id_bound(tok)), eos_id(tok), txt_chunks_safe(tok))
    unique: dict[Path, DataFile] = {}
    for f in sets.all_files():
        unique.setdefault(_file_dir(cache, tok_hash, f, data.text_field), f)
    tasks, pending = _plan_tasks(data, cache, enc, unique, verify, progress)
    if tasks:
        progress(f"preparing {len(pending)} file(s): {len(tasks)} unit(s) on {min(workers, len(tasks))} worker(s)")
    # a killed preparation's temporaries, wherever it was writing (a file finished since by another
    # preparation too); a live writer's are kept
    for directory in (*unique, cache / "hashes", cache / "tokenizers", *([run_dir] if run_dir is not None else [])):
        remove_orphaned_temporaries(directory)
    for directory in {Path(t.out).parent for t in tasks}:
        directory.mkdir(parents=True, exist_ok=True)
    try:
        _run_tasks(tasks, tok, workers, progress, on_unit)
    except DataFileChanged as err:
        for directory, (f, _) in pending.items():  # shards of new content under the old key
            if str(f.path) == err.file:
                shutil.rmtree(directory, ignore_errors=True)
        raise
    for directory, (f, units) in pending.items():
        _finish_file(directory, f, units, tok_hash, enc.dtype)
    index = _build_index(data, cache, enc, sets)
    if seq_len is not None:
        for kind, by_name in index.datasets().items():
            for name, dataset in by_name.items():
                if dataset.tokens < seq_len:
                    raise UserError(f"data too small: {dataset.tokens} tokens, fewer than one block of seq_len={seq_len}",
                                    file=dataset.patterns[0], key=dataset_key(data, kind, name),
                                    fix="add data or lower model.seq_len")
    if run_dir is not None:
        index.write(run_dir)
    return index


def _build_index(data: Data, cache: Path, enc: _Encoding, sets: _Datasets) -> DataIndex:
    """The run's data index from the (now complete) per-file cache indexes."""
    datasets: dict[str, dict[str, Dataset]] = {"train": {}, "validation": {}}
    for kind, by_name in sets.files.items():
        for name, files in by_name.items():
            entries = []
            for f in files:
                directory = _file_dir(cache, enc.tok_hash, f, data.text_field)
                findex = _file_index(directory)
                assert findex is not None  # every pending file was finished above
                shards = [ShardRef(path=(directory / u.shard).relative_to(cache).as_posix(), tokens=u.tokens,
                                   sha256=u.sha256) for u in findex.units]
                entries.append(FileEntry(path=f.path.as_posix(), size=f.size, mtime_ns=f.mtime_ns, sha256=f.sha256,
                                         shards=shards, documents=findex.documents, tokens=findex.tokens))
            datasets[kind][name] = Dataset(patterns=sets.patterns[kind][name], files=entries,
                                           tokens=sum(e.tokens for e in entries),
                                           documents=sum(e.documents for e in entries))
    return DataIndex(format=SHARD_FORMAT, tokenizer=TokenizerRef(name=data.tokenizer, sha256=enc.tok_hash,
                                                                 file=f"tokenizers/{enc.tok_hash}.json"),
                     cache_dir=data.cache_dir, dtype=enc.dtype.name, eos=enc.eos, text_field=data.text_field,
                     train=datasets["train"], validation=datasets["validation"])


def _finish_file(directory: Path, f: DataFile, units: list[Unit], tok_hash: str, dtype: np.dtype) -> None:
    """Write the file's index.json (its shards in unit order) once every unit is done, after
    checking that the file still is what was hashed."""
    metas = []
    for i, unit in enumerate(units):
        meta = read_json_record(directory / f"{i:05d}.json", UnitMeta)
        if meta is None or (meta.start, meta.stop) != (unit.start, unit.stop):
            raise UserError("the shard cache holds units of another layout", file=str(directory),
                            fix=f"delete {directory} and rerun `stepc data prepare`")
        metas.append(CachedUnit(**meta.model_dump(), shard=f"{i:05d}.bin"))
    documents = sum(m.documents for m in metas)
    if documents == 0:
        raise UserError("this data file holds no documents (every text is empty)", file=str(f.path),
                        fix="remove it from the data globs")
    st = f.path.stat()
    if (st.st_size, st.st_mtime_ns) != (f.size, f.mtime_ns):
        shutil.rmtree(directory, ignore_errors=True)
        raise changed_error(f.path)
    index = FileShards(format=SHARD_FORMAT, file_sha256=f.sha256, tokenizer=tok_hash, dtype=dtype.name,
                       units=metas, documents=documents, tokens=sum(m.tokens for m in metas))
    atomic_write_json(directory / "index.json", index.model_dump())
