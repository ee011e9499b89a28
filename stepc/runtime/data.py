"""Training data: read documents, tokenize and pack them into fixed-length blocks, sample them.

Pipeline: ``read_documents`` (parquet / jsonl / txt, globs) -> ``tokenize_to_blocks`` (EOS after
every document, concatenate, cut into ``seq_len`` blocks, drop the tail) -> :class:`PackedDataset`
(the blocks as an int32 array cached on disk under a content fingerprint) ->
:func:`holdout_split` (validation blocks for perplexity) -> :class:`BlockSampler` (which blocks
a rank sees at a step).

The sampler is stateless on purpose: the blocks of a micro-batch are a pure function of
``(seed, step, micro, rank, world)``, so resuming from a checkpoint only needs the step.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import hashlib
import json
import math
import os
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from stepc.runtime.tokenizer import eos_id, load_tokenizer, tokenizer_hash
from stepc.schema.rules import DATA_SUFFIXES
from stepc.schema.spec import Data

# Bump when packing or the cache layout changes: old caches then simply miss.
PACK_FORMAT_VERSION = 1
SUFFIXES = DATA_SUFFIXES  # one list for the compiler and the runtime (stepc/schema/rules.py)
# Second word of the holdout RNG seed. Epoch numbers fill that slot in the sampler, and an epoch
# never gets this large, so the held-out blocks are independent of every epoch's permutation.
_HOLDOUT_STREAM = 0x686F6C64  # "hold"
_ENCODE_CHUNK = 1024  # documents per encode_batch call: bounds memory, keeps Rust threads busy


# --------------------------------------------------------------------------- reading documents

def expand_patterns(patterns: Sequence[str | os.PathLike[str]]) -> list[Path]:
    """Expand globs (``**`` allowed) in order; each pattern's matches sorted; duplicates dropped.

    Relative patterns resolve against the CWD and stay relative (paths "as given"), so a
    fingerprint does not depend on where the repository is checked out.
    """
    files: list[Path] = []
    seen: set[Path] = set()
    for pattern in patterns:
        matches = sorted(p for p in glob.glob(os.fspath(pattern), recursive=True)
                         if os.path.isfile(p))
        if not matches:
            raise ValueError(f"data pattern {os.fspath(pattern)!r} matches no file "
                             f"(relative to {os.getcwd()})")
        for match in map(Path, matches):
            if match.suffix not in SUFFIXES:
                raise ValueError(f"{match}: unsupported data file type {match.suffix!r} "
                                 f"(expected {', '.join(SUFFIXES)})")
            if match.resolve() not in seen:
                seen.add(match.resolve())
                files.append(match)
    return files


def read_file_documents(path: Path, text_field: str = "text") -> list[str]:
    """Documents of one file: parquet column / jsonl field ``text_field``, or a whole .txt file.

    Null and empty documents are skipped (they would only add stray EOS tokens).
    """
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq  # imported lazily: only parquet users pay for pyarrow

        schema = pq.read_schema(path)
        if text_field not in schema.names:
            raise ValueError(f"{path}: no column {text_field!r} (columns: {', '.join(schema.names)}); "
                             "set [data] text_field")
        docs = pq.read_table(path, columns=[text_field]).column(text_field).to_pylist()
    elif path.suffix == ".jsonl":
        docs = []
        with open(path, encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path}:{lineno}: invalid JSON ({exc.msg})") from exc
                if not isinstance(record, dict) or text_field not in record:
                    raise ValueError(f"{path}:{lineno}: no field {text_field!r}; set [data] text_field")
                docs.append(record[text_field])
    elif path.suffix == ".txt":
        # Universal newlines: \r\n and \r become \n, so line endings never change token ids.
        with open(path, encoding="utf-8-sig", newline=None) as fh:
            docs = [fh.read()]
    else:
        raise ValueError(f"{path}: unsupported data file type (expected {', '.join(SUFFIXES)})")
    for doc in docs:
        if doc is not None and not isinstance(doc, str):
            raise ValueError(f"{path}: field {text_field!r} holds {type(doc).__name__}, not text")
    return [doc for doc in docs if doc]


def read_documents(patterns: list[str], text_field: str = "text") -> list[tuple[Path, list[str]]]:
    """``[(file, documents)]`` for every file the patterns match, in a deterministic order."""
    return [(path, read_file_documents(path, text_field)) for path in expand_patterns(patterns)]


# --------------------------------------------------------------------------------- packing

def tokenize_to_blocks(documents: Iterable[str], tok: Tokenizer, seq_len: int,
                       eos: int | None = None) -> tuple[np.ndarray, int]:
    """Tokenize, append EOS after each document, concatenate, cut into ``seq_len`` blocks.

    Returns ``(blocks, total_tokens)``: blocks is int32 of shape ``(total_tokens // seq_len,
    seq_len)``; the last ``total_tokens % seq_len`` tokens are dropped. No special tokens are
    added by the tokenizer's post-processor (packing owns document boundaries).
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be positive, got {seq_len}")
    eos = eos_id(tok) if eos is None else eos
    eos_arr = np.array([eos], dtype=np.int32)
    pieces: list[np.ndarray] = []
    chunk: list[str] = []

    def flush() -> None:
        for enc in tok.encode_batch_fast(chunk, add_special_tokens=False):
            pieces.append(np.asarray(enc.ids, dtype=np.int32))
            pieces.append(eos_arr)
        chunk.clear()

    for doc in documents:
        chunk.append(doc)
        if len(chunk) >= _ENCODE_CHUNK:
            flush()
    flush()
    ids = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int32)
    num_blocks = len(ids) // seq_len
    return ids[: num_blocks * seq_len].reshape(num_blocks, seq_len).copy(), len(ids)


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _sha256_array(arr: np.ndarray) -> str:
    """Checksum of the array's raw bytes (C order), independent of the .npy header."""
    return hashlib.sha256(np.ascontiguousarray(arr).data).hexdigest()


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode("utf-8")


def _atomic_write(path: Path, write: Any) -> None:
    """Call ``write(fh)`` on a unique temp file beside ``path``, fsync, then ``os.replace``."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; other users/ranks must read the cache
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Exclusive advisory lock, so concurrent ranks tokenize once and the rest wait and reuse.

    Correctness does not depend on it (writes are atomic and identical); it only avoids waste.
    """
    with open(path, "a+b") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


class PackedDataset:
    """Packed ``seq_len`` token blocks of some files, cached under ``cache_dir``.

    The cache is keyed by the file contents, tokenizer hash, ``seq_len``, ``text_field`` and the
    packing format. Two files per entry: ``blocks-<key>.npy`` then ``blocks-<key>.json`` (metadata
    with the checksum of the array), each written atomically, the metadata last. On load the
    array must match the metadata's shape and checksum, otherwise it is rebuilt: a half-written
    or corrupted cache is never used. Blocks are memory-mapped, so ranks share the page cache.
    """

    def __init__(self, files: Sequence[str | os.PathLike[str]], tokenizer: Tokenizer, seq_len: int,
                 cache_dir: Path, text_field: str = "text", tokenizer_sha256: str | None = None,
                 verify: bool = True) -> None:
        """``files`` are paths or glob patterns (expanded like :func:`read_documents`).

        ``tokenizer_sha256`` may pass the hash :func:`load_tokenizer` already computed;
        ``verify=False`` skips re-hashing a cached array on load (for very large corpora).
        """
        self.seq_len = int(seq_len)
        self.text_field = text_field
        self.files = expand_patterns(files)
        tok_hash = tokenizer_sha256 or tokenizer_hash(tokenizer)
        file_entries = [{"path": p.as_posix(), "size": p.stat().st_size, "sha256": _sha256_file(p)}
                        for p in self.files]
        key_src = {"format": PACK_FORMAT_VERSION, "files": [e["sha256"] for e in file_entries],
                   "tokenizer": tok_hash, "seq_len": self.seq_len, "text_field": text_field}
        key = hashlib.sha256(_canonical(key_src)).hexdigest()[:32]
        cache_dir = Path(cache_dir)
        cache_dir.mkdir(parents=True, exist_ok=True)
        self.cache_path = cache_dir / f"blocks-{key}.npy"
        meta_path = cache_dir / f"blocks-{key}.json"

        with _file_lock(cache_dir / f"blocks-{key}.lock"):
            loaded = self._load(self.cache_path, meta_path, verify)
            self.from_cache = loaded is not None
            if loaded is None:
                docs = (doc for path in self.files for doc in read_file_documents(path, text_field))
                blocks, total = tokenize_to_blocks(docs, tokenizer, self.seq_len)
                if len(blocks) == 0:
                    raise ValueError(f"data too small: {total} tokens in {len(self.files)} file(s), "
                                     f"fewer than one block of seq_len={self.seq_len}")
                meta = {"format": PACK_FORMAT_VERSION, "shape": list(blocks.shape),
                        "total_tokens": total, "blocks_sha256": _sha256_array(blocks)}
                _atomic_write(self.cache_path, lambda fh: np.save(fh, blocks, allow_pickle=False))
                _atomic_write(meta_path, lambda fh: fh.write(_canonical(meta)))
                loaded = (np.load(self.cache_path, mmap_mode="r", allow_pickle=False), meta)
        self.blocks, meta = loaded

        body = {"files": file_entries, "tokenizer": tok_hash, "seq_len": self.seq_len,
                "text_field": text_field, "num_blocks": int(self.blocks.shape[0]),
                "num_tokens": int(meta["total_tokens"]),
                "blocks_sha256": meta["blocks_sha256"]}
        self._fingerprint = {**body, "sha256": hashlib.sha256(_canonical(body)).hexdigest()}

    def _load(self, npy: Path, meta_path: Path, verify: bool) -> tuple[np.ndarray, dict] | None:
        """The cached blocks and metadata if both exist and agree; None means rebuild."""
        try:
            meta = json.loads(meta_path.read_bytes())
            blocks = np.load(npy, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError, EOFError):
            return None
        if (meta.get("format") != PACK_FORMAT_VERSION or blocks.dtype != np.int32
                or list(blocks.shape) != meta.get("shape") or blocks.shape[1:] != (self.seq_len,)):
            return None
        if verify and _sha256_array(blocks) != meta.get("blocks_sha256"):
            return None
        return blocks, meta

    @property
    def fingerprint(self) -> dict[str, Any]:
        """Identity of the packed data, for the manifest and metrics.

        ``files`` (path as given, size, sha256), ``tokenizer`` hash, ``seq_len``, ``text_field``,
        ``num_blocks``, ``num_tokens`` (all tokens incl. one EOS per document, before the tail
        is dropped; ``num_blocks * seq_len`` are used), ``blocks_sha256`` and ``sha256`` over all
        of these.
        """
        return json.loads(json.dumps(self._fingerprint))  # a copy callers may mutate

    @property
    def num_blocks(self) -> int:
        return int(self.blocks.shape[0])

    def __len__(self) -> int:
        return self.num_blocks


# ------------------------------------------------------------------------------- splitting

def holdout_split(num_blocks: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic ``(train_idx, val_idx)`` block indices, disjoint, both sorted.

    ``round(fraction * num_blocks)`` blocks (at least 1 when ``fraction > 0``) are held out,
    chosen uniformly from ``seed``; at least one block always stays in training.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"holdout fraction must be in [0, 1), got {fraction}")
    if num_blocks < 1:
        raise ValueError("holdout_split needs at least one block")
    n_val = 0 if fraction == 0 else min(num_blocks - 1, max(1, round(fraction * num_blocks)))
    perm = np.random.default_rng([seed, _HOLDOUT_STREAM]).permutation(num_blocks)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


# -------------------------------------------------------------------------------- sampling

class BlockSampler:
    """Deterministic, rank-sharded training order over ``blocks`` (optionally a subset).

    Global sample ``g`` lives in epoch ``g // n`` at position ``g % n`` of that epoch's
    permutation ``np.random.default_rng([seed, epoch]).permutation(n)``. A micro-batch takes
    ``g = ((step * grad_accum + micro) * world + rank) * micro_batch_size + k``: the samples of
    one optimizer step form a contiguous range of ``g``, so ranks never overlap, each epoch
    visits every block once, and the data position is a pure function of ``step``.
    """

    def __init__(self, blocks: np.ndarray, seed: int, indices: np.ndarray | None = None) -> None:
        """``indices`` restricts sampling to those blocks (e.g. ``train_idx`` of a holdout)."""
        self.blocks = blocks
        self.seed = int(seed)
        self.indices = np.arange(len(blocks)) if indices is None else np.asarray(indices, np.int64)
        if len(self.indices) == 0:
            raise ValueError("BlockSampler needs at least one block")
        self._perms: dict[int, np.ndarray] = {}

    @property
    def num_samples(self) -> int:
        """Blocks per epoch."""
        return len(self.indices)

    def permutation(self, epoch: int) -> np.ndarray:
        """Order of epoch ``epoch`` (positions into ``indices``); the last two are memoized."""
        if epoch not in self._perms:
            if len(self._perms) >= 2:  # batches only ever straddle two neighbouring epochs
                self._perms.pop(min(self._perms))
            self._perms[epoch] = np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)
        return self._perms[epoch]

    def block_ids(self, step: int, micro: int, rank: int, world: int, micro_batch_size: int,
                  grad_accum: int) -> np.ndarray:
        """Indices into ``blocks`` of one rank's micro-batch (see the class docstring)."""
        if not (0 <= micro < grad_accum and 0 <= rank < world and micro_batch_size > 0 and step >= 0):
            raise ValueError(f"bad batch coordinates step={step} micro={micro}/{grad_accum} "
                             f"rank={rank}/{world} micro_batch_size={micro_batch_size}")
        start = ((step * grad_accum + micro) * world + rank) * micro_batch_size
        g = np.arange(start, start + micro_batch_size, dtype=np.int64)
        epochs, pos = np.divmod(g, self.num_samples)
        out = np.empty(micro_batch_size, dtype=np.int64)
        for epoch in np.unique(epochs):
            sel = epochs == epoch
            out[sel] = self.indices[self.permutation(int(epoch))[pos[sel]]]
        return out

    def batch(self, step: int, micro: int, rank: int, world: int, micro_batch_size: int,
              grad_accum: int) -> np.ndarray:
        """Tokens of one rank's micro-batch: int64 ``(micro_batch_size, seq_len)``."""
        ids = self.block_ids(step, micro, rank, world, micro_batch_size, grad_accum)
        return np.asarray(self.blocks[ids], dtype=np.int64)

    def epoch_at(self, step: int, world: int, micro_batch_size: int, grad_accum: int) -> float:
        """Fractional epoch reached at the start of ``step`` (for logging)."""
        return step * grad_accum * world * micro_batch_size / self.num_samples


def iter_eval_batches(blocks: np.ndarray, batch_size: int, rank: int, world: int,
                      max_tokens: int | None = None,
                      indices: np.ndarray | None = None) -> Iterator[np.ndarray]:
    """Deterministic evaluation batches for one rank: int64 ``(<= batch_size, seq_len)``.

    Uses the first ``max_tokens // seq_len`` blocks (all when ``max_tokens`` is None or <= 0) of
    ``indices`` (default: all blocks), trimmed to a multiple of ``world`` and dealt round-robin.
    Every rank therefore yields the same number of batches of the same sizes, which FSDP needs
    (a rank that skips a forward pass would hang the others' collectives).
    """
    seq_len = blocks.shape[1]
    order = np.arange(len(blocks)) if indices is None else np.asarray(indices, np.int64)
    if max_tokens is not None and max_tokens > 0:
        order = order[: max(1, max_tokens // seq_len)]
    order = order[: (len(order) // world) * world]
    mine = order[rank::world]
    for start in range(0, len(mine), batch_size):
        yield np.asarray(blocks[mine[start:start + batch_size]], dtype=np.int64)


def eval_num_batches(num_blocks: int, batch_size: int, world: int, seq_len: int,
                     max_tokens: int | None = None) -> int:
    """How many batches :func:`iter_eval_batches` yields per rank (for progress bars)."""
    n = num_blocks if not max_tokens or max_tokens <= 0 else min(num_blocks, max(1, max_tokens // seq_len))
    return math.ceil((n // world) / batch_size)


def open_datasets(data: Data, seq_len: int, cache: Path) -> tuple[Tokenizer, PackedDataset, dict[str, PackedDataset]]:
    """The spec's tokenizer, training blocks and named validation sets (shared by training and `stepc eval`)."""
    tok, tok_hash = load_tokenizer(data.tokenizer, expand_patterns(data.train), cache, data.text_field)
    train = PackedDataset(data.train, tok, seq_len, cache, data.text_field, tok_hash)
    named = {name: PackedDataset([pattern], tok, seq_len, cache, data.text_field, tok_hash)
             for name, pattern in sorted(data.validation.items())}
    return tok, train, named


def eval_sets(train: PackedDataset, named: dict[str, PackedDataset], holdout_fraction: float,
              seed: int) -> tuple[np.ndarray, dict[str, tuple[np.ndarray, np.ndarray | None]]]:
    """(training block indices, {name: (blocks, indices)}): the held-out split plus the named sets.

    One definition for the runtime's evaluations and `stepc eval`, so both score the same blocks.
    """
    train_idx, heldout_idx = holdout_split(train.num_blocks, holdout_fraction, seed)
    sets: dict[str, tuple[np.ndarray, np.ndarray | None]] = {}
    if len(heldout_idx):
        sets["heldout"] = (train.blocks, heldout_idx)
    sets.update({name: (ds.blocks, None) for name, ds in named.items()})
    return train_idx, sets
