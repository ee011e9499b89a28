"""`stepc data prepare`: identical token ids to stepc 0.1's packing, output independent of workers and
chunking, resumable after SIGKILL, incremental, and cheap stage starts (no hashing unless a file changed)."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from stepc.errors import UserError
from stepc.runtime.data import prepared as data_module
from stepc.runtime.data import documents
from stepc.runtime.data.prepared import open_prepared
from stepc.runtime.data.prepare import prepare
from stepc.schema.spec import Data

REPO = Path(__file__).resolve().parents[1]
PLAYS = ["comedy_of_errors.txt", "tempest.txt", "midsummer_nights_dream.txt", "julius_caesar.txt"]
# sha256 of the int32 block array stepc 0.1's PackedDataset built from PLAYS (commit becd991, before the
# shard pipeline replaced it), with the tokenizer's own sha256. Both pipelines were also compared on the
# whole bundled corpus (gpt2 and bpe-4096, seq_len 128): identical.
FROZEN = {
    ("gpt2", 128): ("f93d84a01b0e22e54c109fc65cea3d0541758c9adabbb34770bc27939b548b9b",
                    "48a3474f0554d755574fa97d3b217ec1a1ab1ea519ef7ea5bba4609eba2aaacf", 995),
    ("bpe-512", 64): ("907fcef7773df993afee398e30621badf82837f2a1397b8ca7021349cfac292e",
                      "134246259c8aec9e69d040b78311a72a599ed978b0555788678ed5fcec03825e", 3246),
}


def plays(small_corpus_dir: Path) -> list[str]:
    return [str(small_corpus_dir / name) for name in PLAYS]


@pytest.fixture(scope="module")
def corpus_dir() -> Path:
    root = REPO / "data" / "corpus" / "train"
    if not (REPO / "data" / "corpus" / "COMPLETE").exists():
        from stepc.commands.corpus import build_corpus

        build_corpus(REPO / "data" / "corpus")
    return root


def shard_bytes(cache: Path) -> dict[str, bytes]:
    return {p.relative_to(cache).as_posix(): p.read_bytes() for p in sorted((cache / "shards").rglob("*"))
            if p.is_file() and not p.name.startswith(".")}


@pytest.mark.parametrize("tokenizer,seq_len", sorted(FROZEN))
def test_packing_of_the_bundled_corpus_is_unchanged(tmp_path, monkeypatch, corpus_dir, tokenizer, seq_len):
    """Token ids identical to stepc 0.1's packing, with txt files read in 4 KB chunks (many cut points)."""
    monkeypatch.setattr(documents, "TXT_CHUNK_BYTES", 4096)
    data = Data(train=plays(corpus_dir), tokenizer=tokenizer, cache_dir=str(tmp_path / "cache"))
    index = prepare(data, tmp_path / "cache", tmp_path, workers=1)
    blocks = open_prepared(tmp_path, data, seq_len).train["train"]
    tok_sha, blocks_sha, num_blocks = FROZEN[(tokenizer, seq_len)]
    assert index.tokenizer.sha256 == tok_sha
    assert blocks.num_blocks == num_blocks
    assert hashlib.sha256(blocks.block_array().data).hexdigest() == blocks_sha
    assert index.dtype == "uint16"  # both vocabularies fit in 16 bits
    assert sum(len(f.shards) for f in index.train["train"].files) == len(PLAYS)


def mixed_corpus(root: Path) -> list[str]:
    """A parquet file of 12 row groups of 10 documents and a short 13th of 3, a jsonl file, and a txt file."""
    root.mkdir(parents=True, exist_ok=True)
    docs = [f"Document {i}: " + " ".join(f"word{(i * 7 + j) % 97}" for j in range(40 + i % 13)) for i in range(240)]
    pq.write_table(pa.table({"text": docs[:123]}), root / "a.parquet", row_group_size=10)
    with open(root / "b.jsonl", "w", encoding="utf-8") as fh:
        fh.writelines(json.dumps({"text": doc}) + "\n" for doc in docs[120:])
    (root / "c.txt").write_text("\n".join(docs[:50]) + "\n", encoding="utf-8")
    return [str(root / "a.parquet"), str(root / "b.jsonl"), str(root / "c.txt")]


def test_output_is_independent_of_worker_count_and_unit_size(tmp_path, monkeypatch):
    files = mixed_corpus(tmp_path / "d")
    one = Data(train=files, tokenizer="bpe-512", cache_dir=str(tmp_path / "c1"))
    prepare(one, tmp_path / "c1", None, workers=1)
    monkeypatch.setattr(documents, "TARGET_UNIT_BYTES", 2000)  # several units per parquet and jsonl file
    many = Data(train=files, tokenizer="bpe-512", cache_dir=str(tmp_path / "c2"))
    (tmp_path / "r2").mkdir()
    index = prepare(many, tmp_path / "c2", tmp_path / "r2", workers=2)  # two spawned worker processes
    units = [len(f.shards) for f in index.train["train"].files]
    assert units[0] > 3 and units[1] > 3 and units[2] == 1
    groups = pq.ParquetFile(files[0]).metadata
    tail = groups.row_group(groups.num_row_groups - 1)
    # the short last row group is a unit of its own, below the unit size (read like every other unit)
    assert units[0] == groups.num_row_groups and tail.num_rows == 3 and tail.total_byte_size < 2000
    (tmp_path / "r1").mkdir()
    prepare(one, tmp_path / "c1", tmp_path / "r1", workers=1)
    a = open_prepared(tmp_path / "r1", one, 32).train["train"]
    b = open_prepared(tmp_path / "r2", many, 32).train["train"]
    assert a.num_tokens == b.num_tokens
    assert np.array_equal(a.tokens(0, a.num_tokens), b.tokens(0, b.num_tokens))
    assert np.array_equal(a[np.arange(len(a))], b.block_array())  # blocks that span shards read right


KILL_SCRIPT = """
import sys
from pathlib import Path
from stepc.runtime.data import documents
from stepc.runtime.data.prepare import prepare
from stepc.schema.spec import Data
documents.TARGET_UNIT_BYTES = 3000
files, cache = sys.argv[1].split(","), Path(sys.argv[2])
prepare(Data(train=files, tokenizer="gpt2", cache_dir=str(cache)), cache, None, workers=1,
        progress=lambda line: print(line, flush=True))
"""


def test_killed_preparation_resumes_and_gives_identical_bytes(tmp_path):
    files = mixed_corpus(tmp_path / "d")
    big = tmp_path / "d" / "big.jsonl"  # enough units that the kill lands in the middle
    with open(big, "w", encoding="utf-8") as fh:
        for i in range(1000):
            fh.write(json.dumps({"text": f"Line {i} of a long file. " * 12}) + "\n")
    files.append(str(big))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cache = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, ",".join(files), str(cache)], env=env,
                            stdout=subprocess.PIPE, text=True)
    done = 0
    deadline = time.monotonic() + 120
    while done < 3 and time.monotonic() < deadline:  # wait until a few units are finished, then SIGKILL
        line = proc.stdout.readline()
        done += "units tokenised" in line
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert done >= 3, "the preparation never finished three units"
    finished = {p: p.stat().st_mtime_ns for p in (cache / "shards").rglob("0*.json")}
    assert finished  # some units were complete when the process died
    complete = list((cache / "shards").rglob("index.json"))
    assert len(complete) < len(files), "the kill came too late to test resuming"

    rerun = subprocess.run([sys.executable, "-c", KILL_SCRIPT, ",".join(files), str(cache)], env=env,
                           capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert all(p.stat().st_mtime_ns == m for p, m in finished.items())  # finished shards were kept, not redone
    clean = subprocess.run([sys.executable, "-c", KILL_SCRIPT, ",".join(files), str(tmp_path / "clean")], env=env,
                           capture_output=True, text=True, timeout=300)
    assert clean.returncode == 0, clean.stderr
    assert shard_bytes(cache) == shard_bytes(tmp_path / "clean")
    assert not list(cache.rglob("*.tmp"))


def test_a_killed_writers_temporaries_are_removed_wherever_it_was_writing(tmp_path):
    """Temporaries of a writer of this host whose process is gone go, in every directory a preparation
    writes (also a file's shard directory that another preparation has finished since, and the old
    `.<unit>.<pid>.tmp` form); a live writer's and another node's stay."""
    import socket

    files = mixed_corpus(tmp_path / "d")
    cache, run_dir = tmp_path / "cache", tmp_path / "run"
    run_dir.mkdir()
    data = Data(train=files, tokenizer="bpe-512", cache_dir=str(cache))
    prepare(data, cache, None, workers=1)  # finished: every file has its index.json
    gone = subprocess.Popen(["true"])
    gone.wait()
    host, shard_dir = socket.gethostname(), next((cache / "shards").rglob("index.json")).parent
    dead = [shard_dir / f".00000~{host}~{gone.pid}~.tmp", shard_dir / f".00001.{gone.pid}.tmp",
            cache / "hashes" / f".ab.json~{host}~{gone.pid}~x1y2.tmp", cache / "tokenizers" / f".t.json~{host}~{gone.pid}~q.tmp",
            run_dir / f".data-index.json~{host}~{gone.pid}~z.tmp"]
    kept = [shard_dir / f".00000~{host}~{os.getpid()}~.tmp", shard_dir / f".00000~other-node~{gone.pid}~.tmp"]
    for path in dead + kept:
        path.write_bytes(b"partial")
    # and what real writers leave when SIGKILLed mid-write: a shard and an atomically written record
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for kind, target in (("shard", shard_dir / "00000"), ("atomic", cache / "hashes" / "x.json")):
        before = set(target.parent.iterdir())
        killed = subprocess.run([sys.executable, "-c", KILLED_WRITER, kind, str(target), files[2]], env=env, timeout=60)
        assert killed.returncode == -signal.SIGKILL
        left = set(target.parent.iterdir()) - before
        assert len(left) == 1 and left.pop().name.endswith(".tmp")
        dead += list(set(target.parent.iterdir()) - before)
    prepare(data, cache, run_dir, workers=1)
    assert [p for p in dead if p.exists()] == [] and all(p.exists() for p in kept)


KILLED_WRITER = """
import os, signal, sys
from pathlib import Path
kind, target, text_file = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
def die():
    os.kill(os.getpid(), signal.SIGKILL)
if kind == "atomic":
    from stepc.atomic import atomic_write
    atomic_write(target, lambda fh: (fh.write(b"partial"), fh.flush(), die()))
else:
    from stepc.runtime.data import prepare as P
    from stepc.runtime.data.documents import Unit
    from stepc.runtime.data.tokenizer import load_tokenizer
    P._TOKENIZER = load_tokenizer("gpt2", [], lambda: iter(()), target.parent, "text")[0]
    def one_batch_then_die(*args):
        yield [("some text", False)]
        die()
    P.read_unit = one_batch_then_die
    st = text_file.stat()
    P._encode_unit(P.Task(str(text_file), Unit(0, 0), "text", True, str(target), "uint16", 0, st.st_size, st.st_mtime_ns))
"""


def test_adding_a_file_tokenises_only_that_file(tmp_path):
    files = mixed_corpus(tmp_path / "d")
    cache = tmp_path / "cache"
    lines: list[str] = []
    prepare(Data(train=files[:2], tokenizer="bpe-512", cache_dir=str(cache)), cache, None, workers=1)
    before = {p: p.stat().st_mtime_ns for p in (cache / "shards").rglob("*.bin")}
    tok_before = sorted(p.name for p in (cache / "tokenizers").iterdir())
    # bpe-N trains on the training files, so adding one changes the tokenizer: use validation to add a file.
    data = Data(train=files[:2], tokenizer="bpe-512", cache_dir=str(cache), validation={"extra": files[2]})
    prepare(data, cache, None, workers=1, progress=lines.append)
    assert lines[0].startswith("preparing 1 file(s): 1 unit(s)")
    assert {p: p.stat().st_mtime_ns for p in before} == before
    assert len(list((cache / "shards").rglob("*.bin"))) == len(before) + 1
    assert sorted(p.name for p in (cache / "tokenizers").iterdir()) == tok_before
    lines.clear()
    prepare(data, cache, None, workers=1, progress=lines.append)
    assert lines == []  # nothing left to do


def test_stage_start_trusts_size_and_mtime_and_rehashes_only_changed_files(tmp_path, monkeypatch):
    files = mixed_corpus(tmp_path / "d")
    data = Data(train=files, tokenizer="bpe-512", cache_dir=str(tmp_path / "cache"))
    prepare(data, tmp_path / "cache", tmp_path, workers=1)
    hashed: list[str] = []
    real = data_module.file_sha256_hex
    monkeypatch.setattr(data_module, "file_sha256_hex", lambda p: hashed.append(str(p)) or real(p))
    first = open_prepared(tmp_path, data, 16).fingerprint
    assert hashed == []  # nothing re-hashed: size and mtime match the preparation
    os.utime(files[2], ns=(time.time_ns(), time.time_ns()))  # touched, same bytes
    assert open_prepared(tmp_path, data, 16).fingerprint == first
    assert hashed == [files[2]]
    text = Path(files[2]).read_bytes()
    Path(files[2]).write_bytes(text.replace(b"word1", b"WORD1", 1))  # same size, other content
    with pytest.raises(UserError, match="changed since preparation") as err:
        open_prepared(tmp_path, data, 16)
    assert "stepc data prepare" in err.value.fix


def test_verify_data_retokenises_a_corrupted_shard(tmp_path):
    files = mixed_corpus(tmp_path / "d")
    data = Data(train=files, tokenizer="bpe-512", cache_dir=str(tmp_path / "cache"))
    prepare(data, tmp_path / "cache", tmp_path, workers=1)
    good = shard_bytes(tmp_path / "cache")
    shard = sorted((tmp_path / "cache" / "shards").rglob("*.bin"))[0]
    raw = bytearray(shard.read_bytes())
    raw[10] ^= 0xFF  # same size: only a re-hash notices
    shard.write_bytes(bytes(raw))
    prepare(data, tmp_path / "cache", tmp_path, workers=1)
    assert shard_bytes(tmp_path / "cache") != good  # the default trusts sizes
    lines: list[str] = []
    prepare(data, tmp_path / "cache", tmp_path, workers=1, verify=True, progress=lines.append)
    assert any("does not match its recorded sha256" in line for line in lines)
    assert shard_bytes(tmp_path / "cache") == good


def test_a_truncated_or_missing_shard_under_a_surviving_index_is_prepared_again(tmp_path):
    """Shards cut short or deleted while every index.json and unit record survives: opening the data
    refuses (naming `stepc data prepare`), and preparing again rebuilds exactly those shards."""
    files = mixed_corpus(tmp_path / "d")
    data = Data(train=files, tokenizer="bpe-512", cache_dir=str(tmp_path / "cache"))
    prepare(data, tmp_path / "cache", tmp_path, workers=1)
    good = shard_bytes(tmp_path / "cache")
    expected = open_prepared(tmp_path, data, 16).train["train"]
    expected = expected.tokens(0, expected.num_tokens)
    missing, truncated = sorted((tmp_path / "cache" / "shards").rglob("*.bin"))[:2]
    for damage in ("missing", "truncated"):  # one at a time: each is detected on its own
        if damage == "missing":
            missing.unlink()
        else:
            with open(truncated, "r+b") as handle:
                handle.truncate(truncated.stat().st_size // 2)
        assert len(list((tmp_path / "cache" / "shards").rglob("index.json"))) == len(files)
        with pytest.raises(UserError, match="missing or truncated") as err:
            open_prepared(tmp_path, data, 16)
        assert "stepc data prepare" in err.value.fix
        lines: list[str] = []
        prepare(data, tmp_path / "cache", tmp_path, workers=1, progress=lines.append)
        if damage == "truncated":
            assert any(f"{truncated} is shorter or longer than its recorded tokens" in line for line in lines), lines
        assert shard_bytes(tmp_path / "cache") == good, damage
        blocks = open_prepared(tmp_path, data, 16).train["train"]
        assert np.array_equal(blocks.tokens(0, blocks.num_tokens), expected)


def test_a_file_rewritten_in_place_is_prepared_afresh_under_a_shared_cache(tmp_path):
    """Same path and inode, new bytes and mtime: the run that prepared the old bytes refuses to open
    them, and every preparation through the shared cache (another run's, a re-preparation) tokenises
    the new bytes rather than reusing the old file's remembered hash and shards."""
    files = mixed_corpus(tmp_path / "d")
    data = Data(train=files, tokenizer="gpt2", cache_dir=str(tmp_path / "cache"))  # gpt2: the tokenizer stays
    runs = {name: tmp_path / name for name in ("a", "b", "clean")}
    for run in runs.values():
        run.mkdir()
    prepare(data, tmp_path / "cache", runs["a"], workers=1)
    before = open_prepared(runs["a"], data, 16).train["train"]
    before = before.tokens(0, before.num_tokens)

    rewritten = Path(files[1])
    st = rewritten.stat()
    with open(rewritten, "r+b") as handle:  # in place: the inode stays
        text = handle.read()
        handle.seek(0)
        handle.write(text.replace(b"word1", b"WORD1"))
    os.utime(rewritten, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    now = rewritten.stat()
    assert (now.st_ino, now.st_size) == (st.st_ino, st.st_size) and now.st_mtime_ns != st.st_mtime_ns

    with pytest.raises(UserError, match="changed since preparation"):
        open_prepared(runs["a"], data, 16)
    fresh = Data(train=files, tokenizer="gpt2", cache_dir=str(tmp_path / "fresh"))
    prepare(fresh, tmp_path / "fresh", runs["clean"], workers=1)
    clean = open_prepared(runs["clean"], fresh, 16).train["train"]
    clean = clean.tokens(0, clean.num_tokens)
    assert not np.array_equal(clean, before)
    for run in (runs["b"], runs["a"]):  # another run on the shared cache, and the first run preparing again
        prepare(data, tmp_path / "cache", run, workers=1)
        blocks = open_prepared(run, data, 16).train["train"]
        assert np.array_equal(blocks.tokens(0, blocks.num_tokens), clean), run


def test_ids_above_65535_are_stored_in_32_bits_and_read_back(tmp_path):
    """A tokenizer.json whose ids reach 70000 with only ~300 tokens (ids may leave gaps): the shards are
    uint32 and every id, those >= 65536 included, reads back as the tokenizer produced it."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(300)} | {"<|endoftext|>": 300, "[UNK]": 301}
    vocab |= {f"far{j}": 65530 + j for j in range(12)} | {"farthest": 70000}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(tmp_path / "tokenizer.json"))
    words = [f"w{i % 300}" if i % 3 else (f"far{i % 12}" if i % 7 else "farthest") for i in range(3000)]
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.txt").write_text(" ".join(words))
    data = Data(train=[str(tmp_path / "d" / "a.txt")], tokenizer=str(tmp_path / "tokenizer.json"),
                cache_dir=str(tmp_path / "cache"))
    index = prepare(data, tmp_path / "cache", tmp_path, workers=1)
    assert index.dtype == "uint32"
    blocks = open_prepared(tmp_path, data, 16).train["train"]
    ids = blocks.tokens(0, blocks.num_tokens)
    assert ids.tolist() == tok.encode(" ".join(words)).ids + [300]  # then EOS
    assert ids.max() == 70000 and (ids >= 65536).sum() > 100


def test_bpe_on_a_large_corpus_trains_on_a_fixed_sample(tmp_path, monkeypatch):
    """Above BPE_SAMPLE_CHARS of text, bpe-N trains on seeded whole units up to that budget:
    deterministic, bounded, and keyed apart from a tokenizer trained on everything."""
    from stepc.runtime.data import prepare as prepare_module
    from stepc.runtime.data import tokenizer as tokenizer_module

    files = mixed_corpus(tmp_path / "d")
    whole = prepare(Data(train=files, tokenizer="bpe-512", cache_dir=str(tmp_path / "c0")), tmp_path / "c0", None, 1)
    monkeypatch.setattr(documents, "TARGET_UNIT_BYTES", 2000)
    monkeypatch.setattr(prepare_module, "BPE_SAMPLE_CHARS", 4000)
    monkeypatch.setattr(tokenizer_module, "BPE_SAMPLE_CHARS", 4000)
    read: list[int] = []
    real_train = tokenizer_module.train_bpe
    monkeypatch.setattr(tokenizer_module, "train_bpe", lambda n, docs: read.append(sum(map(len, docs))) or real_train(n, docs))
    a = prepare(Data(train=files, tokenizer="bpe-512", cache_dir=str(tmp_path / "c1")), tmp_path / "c1", None, 1)
    b = prepare(Data(train=files, tokenizer="bpe-512", cache_dir=str(tmp_path / "c2")), tmp_path / "c2", None, 1)
    assert a.tokenizer.sha256 == b.tokenizer.sha256 != whole.tokenizer.sha256
    assert len(read) == 2 and all(4000 <= n < 4000 + 5000 for n in read)  # the budget plus at most one document
    assert {p.name for p in (tmp_path / "c1" / "tokenizers").glob("tokenizer-*")} != \
           {p.name for p in (tmp_path / "c0" / "tokenizers").glob("tokenizer-*")}


def _long_line(chars: int) -> str:
    """One line of varied text: words, runs of spaces and tabs, contractions, digits, punctuation, letters
    outside ASCII, and the EOS token's own spelling, so cuts land next to every kind of pre-token."""
    words = ["the", "It's", "we'll", "naïve", "café", "Straße", "12345", "6.75", "--", "(x)", "<|endoftext|>",
             "\t", "  ", "end.", "ÅÄÖ", "日本語", "a", "'s"]
    out, i, size = [], 0, 0
    while size < chars:
        out.append(words[(i * 7) % len(words)] + ("" if i % 5 else "   "))
        size += len(out[-1]) + 1
        i += 1
    return " ".join(out)[:chars]


@pytest.mark.parametrize("fmt", ["txt", "jsonl", "parquet"])
@pytest.mark.parametrize("tokenizer", ["gpt2", "bpe-512"])
def test_a_long_document_is_encoded_in_bounded_pieces_with_the_ids_of_the_whole(tmp_path, monkeypatch, fmt, tokenizer):
    """No encode call gets more than MAX_ENCODE_CHARS characters (a 30 MB line took 4.5 GB), and the shard
    holds exactly the ids of the whole document encoded at once; a bpe-N tokenizer trained on the pieces
    is the one trained on the whole."""
    from tokenizers import Tokenizer

    from stepc.runtime.data import prepare as prep
    from stepc.runtime.data.tokenizer import train_bpe

    line = _long_line(60_000)
    path = tmp_path / f"long.{fmt}"
    if fmt == "txt":
        path.write_text(line, encoding="utf-8")
    elif fmt == "jsonl":
        path.write_text(json.dumps({"text": "a short one"}) + "\n" + json.dumps({"text": line}) + "\n", encoding="utf-8")
    else:
        pq.write_table(pa.table({"text": ["a short one", line]}), path)
    limit, sizes = 4096, []

    class Spy:  # the workers' tokenizer, recording how much text each encode call gets
        def __init__(self, tok):
            self.tok = tok

        def encode_batch_fast(self, texts, **kwargs):
            sizes.append(sum(map(len, texts)))
            return self.tok.encode_batch_fast(texts, **kwargs)

    monkeypatch.setattr(documents, "MAX_ENCODE_CHARS", limit)
    monkeypatch.setattr(prep, "_init_worker", lambda tok_json: setattr(prep, "_TOKENIZER", Spy(Tokenizer.from_str(tok_json))))
    data = Data(train=[str(path)], tokenizer=tokenizer, cache_dir=str(tmp_path / "cache"))
    index = prepare(data, tmp_path / "cache", None, workers=1)
    assert sizes and max(sizes) <= limit and sum(sizes) >= len(line), sizes[:5]

    tok = Tokenizer.from_file(str(tmp_path / "cache" / index.tokenizer.file))
    eos = index.eos
    docs = [line] if fmt == "txt" else ["a short one", line]
    expected = [i for doc in docs for i in [*tok.encode(doc, add_special_tokens=False).ids, eos]]
    shard = index.train["train"].files[0].shards
    got = np.concatenate([np.fromfile(tmp_path / "cache" / s.path, dtype=index.dtype) for s in shard])
    assert got.tolist() == expected
    if tokenizer.startswith("bpe-"):
        monkeypatch.setattr(documents, "MAX_ENCODE_CHARS", 10**9)  # no cut: the whole document at once
        assert train_bpe(512, docs).to_str() == tok.to_str()


MEMORY_PROBE = """
import resource, subprocess, sys
proc = subprocess.run([sys.executable, "-m", "stepc.cli", "data", "prepare", sys.argv[1], "--workers", "1"],
                      capture_output=True, text=True)
print(proc.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss // 1024, proc.stderr[-2000:])
"""


def test_a_single_long_line_prepares_within_the_memory_bound(tmp_path):
    """README: < 500 MB per tokeniser worker. An 8 MB single-line jsonl document took ~1.1 GB before it
    was cut (the tokenizer holds ~125 bytes per character); one worker in the process itself here."""
    line = _long_line(8_000_000)
    (tmp_path / "long.jsonl").write_text(json.dumps({"text": line}) + "\n", encoding="utf-8")
    spec = tmp_path / "spec.toml"
    spec.write_text(f"""[experiment]\nname = "long"\n[model]\nhidden_size = 64\nnum_layers = 2\nnum_attention_heads = 4
vocab_size = 50257\nseq_len = 64\n[memory]\nlayers = [1, 1]\n[step]\nlora_rank = 4\n[data]
train = ["{tmp_path / 'long.jsonl'}"]\ntokenizer = "gpt2"\ncache_dir = "{tmp_path / 'cache'}"\n""")
    out = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(spec)], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(REPO)}).stdout
    code, peak_mb, err = out.split(" ", 2)
    assert code == "0", err
    assert int(peak_mb) < 500, f"peak RSS {peak_mb} MB"
    print(f"peak RSS {peak_mb} MB")
