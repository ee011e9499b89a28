"""Instruction data for method "sft": tokenised once before torchrun, then (input_ids, labels) rows.

Preparation (`stepc data prepare RUN_DIR`, run by the stage scripts, `stepc run` and run.sbatch): the
[sft] train files must still be the ones `stepc compile` counted (sha256 in manifest.json: the plan's
steps depend on them); each example is rendered with the spec's template (stepc.schema.templates)
and tokenised piece by piece with the init_from export's own tokenizer, the end-of-text token after
every response. An example longer than model.seq_len is an error naming the file and line. The
result, RUN_DIR/instructions/ (flat token ids, a flat "trained" mask, example offsets, index.json
written last), is quick to reuse: a rerun with unchanged inputs only hashes the data files.

Batches: one example per row, right-padded to seq_len (padding, not packing: under plain causal
attention with no mask, a token only ever sees earlier tokens of its own row, so examples never
attend to each other; every step has the same shape, so nothing recompiles and the memory model's
activation count holds; the price is compute spent on padding). Labels are the token ids on
response tokens and their end-of-text tokens, IGNORE_INDEX on prompt and padding tokens, so the
chunked cross-entropy (stepc.runtime.loop.loss) averages over response tokens only. The order is
pre-training's: epoch e is a seeded permutation of the examples, and the rows of a micro-batch are
a pure function of (seed, step, micro, rank, world), so a resumed run reads exactly the rows the
uninterrupted one would have.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from stepc.errors import UserError
from stepc.atomic import atomic_write_bytes, atomic_write_json
from stepc.hashing import file_sha256_hex
from stepc.rundir import RunDir
from stepc.runtime.data.index import DataFingerprint, InstructionsFingerprint
from stepc.runtime.data.sampler import BlockSampler
from stepc.runtime.data.shards import token_dtype
from stepc.runtime.data.tokenizer import eos_id
from stepc.schema.conversations import expand, read_examples
from stepc.schema.plan import Plan
from stepc.schema.shapes import IGNORE_INDEX
from stepc.schema.spec import Spec
from stepc.schema.templates import render

FORMAT = 1
ARRAYS = ("tokens", "trained", "offsets")
ENCODE_BATCH = 1024  # examples per encode_batch call


def directory(run_dir: Path) -> Path:
    return Path(run_dir) / "instructions"


@dataclass
class Examples:
    tokens: np.ndarray  # every example's ids, one after another
    trained: np.ndarray  # 1 where the token is a label (response or its end-of-text), same length
    offsets: np.ndarray  # example i is tokens[offsets[i]:offsets[i + 1]]
    tokenizer: Tokenizer
    fingerprint: DataFingerprint

    def __len__(self) -> int:
        return len(self.offsets) - 1


# ------------------------------------------------------------------------------------- inputs

def tokenizer_of(plan: Plan) -> tuple[Tokenizer, str]:
    """The init_from export's tokenizer.json, which must be the file `stepc compile` recorded."""
    record = plan.sft.init_from
    path = RunDir(Path(record.run_dir)).export / "tokenizer.json"
    recorded = record.export.get("tokenizer.json")
    fix = (f"restore {record.run_dir}'s export (or recompile this spec with `stepc compile SPEC --force` to tune the export "
           "as it is now); launch from the directory init_from is relative to")
    if recorded is None:
        raise UserError(f"the export of init_from {record.run_dir} has no tokenizer.json", file=str(path.parent),
                        key="sft.init_from", fix="tune a run exported by this stepc (it saves the tokenizer beside the weights)")
    if not path.is_file() or file_sha256_hex(path) != recorded:
        raise UserError("init_from's tokenizer is missing or differs from the one manifest.json records", file=str(path),
                        key="sft.init_from", fix=fix)
    return Tokenizer.from_file(str(path)), recorded


def check_data(spec: Spec, plan: Plan) -> list[Path]:
    """The [sft] train files, which must be exactly those `stepc compile` counted, with the same content."""
    recorded = {d.path: d for d in plan.sft.data}
    paths = [path for _, path in expand(list(spec.sft.train))]
    fix = ("restore it, or recompile the spec (`stepc compile SPEC --force`) so the plan counts the examples as they "
           "are now")
    for path in paths:
        entry = recorded.get(path.as_posix())
        if entry is None:
            raise UserError("this file matches sft.train but was not there when the spec was compiled", file=str(path),
                            key="sft.train", fix=fix.replace("restore it", "remove it"))
        if path.stat().st_size != entry.size or file_sha256_hex(path) != entry.sha256:
            raise UserError("this instruction file changed since `stepc compile` counted its examples", file=str(path),
                            key="sft.train", fix=fix)
    gone = sorted(set(recorded) - {p.as_posix() for p in paths})
    if gone:
        raise UserError("this instruction file was compiled into the plan but is gone", file=gone[0], key="sft.train", fix=fix)
    return paths


def _key(spec: Spec, plan: Plan, tokenizer_sha256: str) -> dict[str, Any]:
    """Everything the prepared arrays depend on."""
    s = spec.sft
    return {"format": FORMAT, "files": [[d.path, d.sha256] for d in plan.sft.data], "tokenizer": tokenizer_sha256,
            "data_format": s.format, "template": s.template, "system": s.system, "seq_len": spec.model.seq_len}


# -------------------------------------------------------------------------------- preparation

def tokenise(spec: Spec, paths: list[Path], tok: Tokenizer) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(tokens, trained mask, offsets) of every example, in file and line order."""
    s, seq_len = spec.sft, spec.model.seq_len
    eos = eos_id(tok)
    dtype = token_dtype(tok.get_vocab_size())
    ids: list[np.ndarray] = []
    masks: list[np.ndarray] = []
    lengths: list[int] = []

    def flush(batch: list[tuple[Path, int, list]]) -> None:
        texts = [piece.text for _, _, pieces in batch for piece in pieces]
        encoded = iter(tok.encode_batch_fast(texts, add_special_tokens=False) if texts else [])
        for path, lineno, pieces in batch:
            row: list[int] = []
            mask: list[int] = []
            prompt = 0
            for piece in pieces:
                piece_ids = next(encoded).ids + ([eos] if piece.response else [])
                row += piece_ids
                mask += [int(piece.response)] * len(piece_ids)
                prompt += 0 if piece.response else len(piece_ids)
            if len(row) > seq_len:
                raise UserError(f"line {lineno}: the example is {len(row)} tokens ({prompt} of prompt, {len(row) - prompt} of "
                                f"response and end-of-text), longer than model.seq_len = {seq_len}", file=f"{path}:{lineno}",
                                key="sft.train", fix="shorten or remove the example: each example is one row of seq_len "
                                                     "tokens (init_from's model), never split")
            ids.append(np.asarray(row, dtype=dtype))
            masks.append(np.asarray(mask, dtype=np.uint8))
            lengths.append(len(row))

    for path in paths:
        batch: list[tuple[Path, int, list]] = []
        for lineno, conversation in read_examples(path, s.format):
            batch.append((path, lineno, render(s.template, conversation, s.system)))
            if len(batch) == ENCODE_BATCH:
                flush(batch)
                batch = []
        flush(batch)
    if not lengths:
        raise UserError("the instruction data holds no examples", file=str(paths[0]) if paths else None, key="sft.train",
                        fix="point sft.train at non-empty jsonl files")
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    return np.concatenate(ids), np.concatenate(masks), offsets


def prepare(run_dir: Path | None, spec: Spec, plan: Plan, progress: Callable[[str], None] = lambda line: None
            ) -> dict[str, Any]:
    """Tokenise the instruction data (unless RUN_DIR/instructions is current) and return its index.
    Without a run directory only checks and tokenises (nothing is written)."""
    paths = check_data(spec, plan)
    key = _key(spec, plan, plan.sft.init_from.export.get("tokenizer.json"))
    if run_dir is not None:  # current: the stage preflight then checks init_from's export itself, hashes and all
        index = _read_index(run_dir)
        if index is not None and index.get("key") == key and _arrays_present(run_dir, index):
            return index
    tok, _ = tokenizer_of(plan)
    progress(f"tokenising {len(paths)} instruction file(s) with {plan.sft.init_from.run_dir}'s tokenizer")
    tokens, trained, offsets = tokenise(spec, paths, tok)
    arrays = {"tokens": tokens, "trained": trained, "offsets": offsets}
    blobs = {name: _npy(a) for name, a in arrays.items()}
    lengths = np.diff(offsets)
    index = {"key": key, "examples": len(lengths), "tokens": int(len(tokens)), "response_tokens": int(trained.sum()),
             "longest": int(lengths.max()), "arrays": {n: {"bytes": len(b), "sha256": hashlib.sha256(b).hexdigest()}
                                                        for n, b in blobs.items()}}
    if index["examples"] != plan.sft.examples:  # both counted the same lines of the same bytes
        raise UserError(f"tokenised {index['examples']} examples, but the plan counted {plan.sft.examples}",
                        file=str(paths[0]), key="sft.train", fix="recompile the spec with `stepc compile SPEC --force`")
    if run_dir is not None:
        for name, blob in blobs.items():
            atomic_write_bytes(directory(run_dir) / f"{name}.npy", blob)
        atomic_write_json(directory(run_dir) / "index.json", index)  # last: it vouches for the arrays
    return index


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def _read_index(run_dir: Path) -> dict[str, Any] | None:
    try:
        index = json.loads((directory(run_dir) / "index.json").read_text())
    except (OSError, ValueError):
        return None
    return index if isinstance(index, dict) else None


def _arrays_present(run_dir: Path, index: dict[str, Any]) -> bool:
    try:
        return all((directory(run_dir) / f"{n}.npy").stat().st_size == index["arrays"][n]["bytes"] for n in ARRAYS)
    except (OSError, KeyError, TypeError):
        return False


# --------------------------------------------------------------------------- preflight, loading

def check_prepared(run_dir: Path, spec: Spec, plan: Plan) -> dict[str, Any]:
    """The stage preflight: RUN_DIR/instructions was prepared from the data and tokenizer the manifest records."""
    index = _read_index(run_dir)
    tok_sha = plan.sft.init_from.export.get("tokenizer.json") if plan.sft and plan.sft.init_from else None
    if index is None or index.get("key") != _key(spec, plan, tok_sha) or not _arrays_present(run_dir, index):
        raise UserError("the instruction data is not prepared for this manifest (RUN_DIR/instructions is missing, "
                        "incomplete or made from other data)", file=str(directory(run_dir)),
                        fix=f"run `stepc data prepare {run_dir}` (the stage scripts and `stepc run` do) from the directory "
                            "the spec's paths are relative to")
    return index


def open_examples(run_dir: Path, spec: Spec, plan: Plan) -> Examples:
    """The prepared examples, memory-mapped, with the tokenizer and a fingerprint of what was trained on."""
    index = check_prepared(run_dir, spec, plan)
    arrays = {n: np.load(directory(run_dir) / f"{n}.npy", mmap_mode="r", allow_pickle=False) for n in ARRAYS}
    tok, _ = tokenizer_of(plan)
    fingerprint = DataFingerprint({"instructions": InstructionsFingerprint.seal(key=index["key"], arrays=index["arrays"])})
    return Examples(arrays["tokens"], arrays["trained"], arrays["offsets"], tok, fingerprint)


class InstructionSampler:
    """(input_ids, labels) rows of one rank's micro-batch: one example per row, right-padded to seq_len."""

    def __init__(self, examples: Examples, seed: int, seq_len: int) -> None:
        self.examples, self.seq_len = examples, seq_len
        self.pad = eos_id(examples.tokenizer)  # any id works: padding is never a label and never attended to
        # pre-training's order over blocks, here over examples: epoch e = default_rng([seed, e]).permutation(n)
        self.order = BlockSampler(None, seed, indices=np.arange(len(examples)))

    def batch(self, step: int, micro: int, rank: int, world: int, micro_batch_size: int,
              grad_accum: int) -> tuple[np.ndarray, np.ndarray]:
        ids = self.order.block_ids(step, micro, rank, world, micro_batch_size, grad_accum)
        return rows(self.examples, ids, self.seq_len, self.pad)


def rows(examples: Examples, ids: np.ndarray, seq_len: int, pad: int) -> tuple[np.ndarray, np.ndarray]:
    """input_ids and labels (IGNORE_INDEX on prompt and padding) of examples `ids`, int64 (len(ids), seq_len)."""
    inputs = np.full((len(ids), seq_len), pad, dtype=np.int64)
    labels = np.full((len(ids), seq_len), IGNORE_INDEX, dtype=np.int64)
    for row, i in enumerate(np.asarray(ids).tolist()):
        start, stop = int(examples.offsets[i]), int(examples.offsets[i + 1])
        tokens = np.asarray(examples.tokens[start:stop], dtype=np.int64)
        inputs[row, :stop - start] = tokens
        labels[row, :stop - start] = np.where(np.asarray(examples.trained[start:stop]) > 0, tokens, IGNORE_INDEX)
    return inputs, labels
