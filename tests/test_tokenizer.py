"""Tokenizer loading: GPT-2 from the offline vocabulary, bpe-N training/caching, local files."""

from __future__ import annotations

from pathlib import Path

import pytest

from stepc.hashing import file_sha256_hex
from stepc.runtime.data.documents import iter_documents
from stepc.runtime.data.tokenizer import EOS_TOKEN, eos_id, tokenizer_hash
from stepc.runtime.data.tokenizer import load_tokenizer as _load_tokenizer

WORDS = ("the king and queen of denmark speak to the ghost upon the battlements at night "
         "while horatio and marcellus watch the sea and the stars over elsinore castle").split()


def load_tokenizer(name: str, files: list[Path], cache: Path):
    """The tokenizer module's loader, fed the files' hashes and documents as `stepc data prepare` does."""
    return _load_tokenizer(name, [file_sha256_hex(f) for f in files],
                           lambda: (doc for f in files for doc in iter_documents(Path(f), "text")), cache)


def write_text_files(root: Path, n: int = 3) -> list[Path]:
    """A few deterministic pseudo-English files (~30 KB total)."""
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        lines = [" ".join(WORDS[(i + j * k) % len(WORDS)] for k in range(1, 12)).capitalize() + "."
                 for j in range(300)]
        path = root / f"doc{i}.txt"
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        paths.append(path)
    return paths


def test_gpt2_known_ids(tmp_path: Path) -> None:
    tok, digest = load_tokenizer("gpt2", [], tmp_path)
    assert tok.get_vocab_size() == 50257
    assert tok.encode("Hello world").ids == [15496, 995]
    assert tok.encode(" Hello world").ids == [18435, 995]
    assert tok.encode("<|endoftext|>").ids == [50256]
    assert eos_id(tok) == 50256
    text = "Hello  world\n\n  it's ü 😀"
    assert tok.decode(tok.encode(text).ids) == text
    assert len(digest) == 64 and digest == tokenizer_hash(tok)
    assert load_tokenizer("gpt2", [], tmp_path)[1] == digest  # stable across loads


def test_bpe_training_is_deterministic_and_cached(tmp_path: Path) -> None:
    files = write_text_files(tmp_path / "data")
    tok_a, hash_a = load_tokenizer("bpe-512", files, tmp_path / "cache-a")
    tok_b, hash_b = load_tokenizer("bpe-512", files, tmp_path / "cache-b")
    assert hash_a == hash_b  # two independent trainings
    # N is an upper bound: a tiny corpus runs out of pairs to merge before reaching it.
    assert 257 < tok_a.get_vocab_size() <= 512
    assert eos_id(tok_a) == tok_a.token_to_id(EOS_TOKEN)

    cached = list((tmp_path / "cache-a").glob("tokenizer-*.json"))
    assert len(cached) == 1
    mtime = cached[0].stat().st_mtime_ns
    assert load_tokenizer("bpe-512", files, tmp_path / "cache-a")[1] == hash_a
    assert cached[0].stat().st_mtime_ns == mtime  # reused, not retrained

    text = "The ghost speaks to Horatio at night.\n"
    assert tok_a.decode(tok_a.encode(text).ids) == text  # byte-level: lossless round trip

    # Different training data -> a different cache entry and tokenizer.
    files[0].write_text("completely different words: zebra xylophone quartz\n" * 50)
    assert load_tokenizer("bpe-512", files, tmp_path / "cache-a")[1] != hash_a


def test_bpe_corrupt_cache_is_retrained(tmp_path: Path) -> None:
    files = write_text_files(tmp_path / "data", n=1)
    _, digest = load_tokenizer("bpe-512", files, tmp_path / "cache")
    (cache_file,) = (tmp_path / "cache").glob("tokenizer-*.json")
    cache_file.write_text('{"truncated": ')
    assert load_tokenizer("bpe-512", files, tmp_path / "cache")[1] == digest


def test_local_tokenizer_file_and_directory(tmp_path: Path) -> None:
    files = write_text_files(tmp_path / "data", n=1)
    tok, digest = load_tokenizer("bpe-512", files, tmp_path / "cache")
    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    tok.save(str(hf_dir / "tokenizer.json"))
    assert load_tokenizer(str(hf_dir), [], tmp_path)[1] == digest
    assert load_tokenizer(str(hf_dir / "tokenizer.json"), [], tmp_path)[1] == digest


@pytest.mark.parametrize("name", ["gpt-2", "bpe-", "bpe-100", "no/such/dir", "llama"])
def test_unknown_tokenizer_names_accepted_forms(tmp_path: Path, name: str) -> None:
    with pytest.raises(ValueError, match="gpt2|at least 512"):
        load_tokenizer(name, [], tmp_path)


def test_eos_id_missing_raises(tmp_path: Path) -> None:
    from tokenizers import Tokenizer, models

    tok = Tokenizer(models.BPE(vocab={"a": 0}, merges=[]))
    with pytest.raises(ValueError, match="end-of-document"):
        eos_id(tok)
