"""Weighted sources: the spec form, the deterministic step-addressed blend, and its record in the
data index and fingerprint."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from stepc.cli import main
from stepc.runtime.data.index import file_ids
from stepc.runtime.data.prepared import open_prepared, training_sets
from stepc.runtime.data.prepare import prepare
from stepc.runtime.data.sampler import BlendSampler, BlockSampler
from stepc.schema.spec import Data

SIZES, WEIGHTS = (30, 50, 20), (0.6, 0.3, 0.1)  # blend epoch M = 100: 60, 30 and 10 samples per source


def sampler(seed: int = 5) -> BlendSampler:
    sources = [(np.full((n, 2), s, dtype=np.int32), np.arange(n)) for s, n in enumerate(SIZES)]
    return BlendSampler(sources, WEIGHTS, seed)


def samples(s: BlendSampler, steps: range, world: int = 2, mbs: int = 5, ga: int = 2) -> list[tuple[int, int]]:
    return [x for step in steps for micro in range(ga) for rank in range(world)
            for x in s.sample_ids(step, micro, rank, world, mbs, ga)]


def test_every_blend_epoch_draws_each_source_by_weight_and_every_source_epoch_covers_it():
    s = sampler()
    assert s.counts.tolist() == [60, 30, 10] and s.num_samples == 100
    drawn = samples(s, range(25))  # 20 samples per step: 5 blend epochs
    for epoch in range(5):
        per_source = Counter(src for src, _ in drawn[epoch * 100:(epoch + 1) * 100])
        assert [per_source[i] for i in range(3)] == [60, 30, 10]
    blocks = {src: Counter(b for x, b in drawn if x == src) for src in range(3)}
    assert set(blocks[0].values()) == {10}  # 300 samples = 10 whole epochs of 30 blocks
    assert set(blocks[1].values()) == {3}   # 150 samples = 3 whole epochs of 50 blocks
    assert sorted(blocks[2]) == list(range(20)) and set(blocks[2].values()) <= {2, 3}  # 2.5 epochs
    epoch0 = [b for src, b in drawn[:100] if src == 0]  # one blend epoch holds 2 whole epochs of source 0
    assert Counter(epoch0) == {b: 2 for b in range(30)} and epoch0[:30] != sorted(epoch0[:30])


def test_blend_is_step_addressed_and_independent_of_the_rank_layout():
    a, b = sampler(), sampler()
    full = [samples(a, range(s, s + 1)) for s in range(12)]
    assert [samples(b, range(s, s + 1)) for s in range(7, 12)] == full[7:]  # "resume" at step 7, fresh sampler
    one_rank = [samples(sampler(), range(s, s + 1), world=1, mbs=10) for s in range(12)]
    assert one_rank == full  # 1 rank x 10 vs 2 ranks x 5: the same samples per step, in rank order
    assert samples(sampler(seed=6), range(12)) != [x for step in full for x in step]
    batch = a.batch(3, 1, 1, 2, 5, 2)
    assert batch.shape == (5, 2) and batch.dtype == np.int64
    assert batch[:, 0].tolist() == [src for src, _ in a.sample_ids(3, 1, 1, 2, 5, 2)]


def write_source(root: Path, name: str, words: str, n: int = 40) -> str:
    root.mkdir(parents=True, exist_ok=True)
    path = root / f"{name}.txt"
    path.write_text("\n".join(f"{words} line {i}, and more {words} after it." for i in range(n)) + "\n")
    return str(path)


def test_blend_prepared_opened_and_fingerprinted(tmp_path):
    a = write_source(tmp_path / "d", "a", "alpha beta")
    b = write_source(tmp_path / "d", "b", "gamma delta")
    data = Data.model_validate({"sources": {"web": {"files": [a], "weight": 3.0}, "books": {"files": [b]}},
                                "tokenizer": "bpe-512", "cache_dir": str(tmp_path / "cache"), "holdout_fraction": 0.1})
    index = prepare(data, tmp_path / "cache", tmp_path, workers=1)
    assert set(index.train) == {"web", "books"}  # shards per source; weights are read from the spec
    prepared = open_prepared(tmp_path, data, 16)
    sampler, sets = training_sets(prepared, data.holdout_fraction, seed=1, weights=data.weights_at(1))
    assert isinstance(sampler, BlendSampler) and set(sets) == {"heldout-web", "heldout-books"}
    names = ("books", "web")  # sources in name order
    sizes = [len(prepared.train[n]) for n in names]
    assert sampler.counts.tolist()[1] == pytest.approx(0.75 * sampler.num_samples, abs=1)
    held = {name: set(idx.tolist()) for name, (_, idx) in sets.items()}
    seen = Counter()
    for step in range(40):
        for src, block in sampler.sample_ids(step, 0, 0, 1, 4, 1):
            seen[src] += 1
            assert block not in held[f"heldout-{names[src]}"]  # never trains on held-out blocks
            assert 0 <= block < sizes[src]
    assert seen[1] > 2 * seen[0]
    fp = prepared.fingerprint.to_json()["train"]
    assert {n: f["weight"] for n, f in fp["sources"].items()} == {"web": 3.0, "books": 1.0}
    recorded, now = prepared.fingerprint.files(), file_ids(index, blend=True)
    assert set(recorded) == set(now) == {"train.web", "train.books"}  # what the stage preflight compares
    assert all([(f.path, f.sha256) for f in recorded[k]] == [(f.path, f.sha256) for f in now[k]] for k in now)

    reweighted = Data.model_validate({**data.model_dump(), "sources": {"web": {"files": [a], "weight": 1.0},
                                                                       "books": {"files": [b]}}})
    prepare(reweighted, tmp_path / "cache", tmp_path, workers=1)
    assert open_prepared(tmp_path, reweighted, 16).fingerprint.to_json()["train"]["sha256"] != fp["sha256"]


def test_data_train_stays_one_source_with_the_old_sampler(tmp_path):
    a = write_source(tmp_path / "d", "a", "alpha beta")
    data = Data(train=[a], tokenizer="bpe-512", cache_dir=str(tmp_path / "cache"))
    assert {n: (s.files, s.weight) for n, s in data.training_sources().items()} == {"train": ([a], 1.0)}
    prepare(data, tmp_path / "cache", tmp_path, workers=1)
    sampler, sets = training_sets(open_prepared(tmp_path, data, 16), data.holdout_fraction, seed=1)
    assert isinstance(sampler, BlockSampler) and set(sets) == {"heldout"}


def test_train_and_sources_together_are_refused(tmp_path, capsys):
    spec = tmp_path / "s.toml"
    spec.write_text('[experiment]\nname = "b"\n[model]\nhidden_size = 64\nnum_layers = 2\nnum_attention_heads = 4\n'
                    'vocab_size = 512\nseq_len = 64\n[memory]\nlayers = [1, 1]\n[data]\ntrain = ["x/*.txt"]\n'
                    'tokenizer = "bpe-512"\n[data.sources.web]\nfiles = ["a/*.parquet"]\n')
    assert main(["plan", str(spec)]) == 2
    err = capsys.readouterr().err
    assert str(spec) in err and "data.train" in err and "data.sources" in err and "Traceback" not in err


def test_a_different_blend_per_stage(tmp_path):
    a = write_source(tmp_path / "d", "a", "alpha beta")
    b = write_source(tmp_path / "d", "b", "gamma delta")
    data = Data.model_validate({"sources": {"web": {"files": [a], "weight": 1.0, "stage_weights": [3.0, 1.0]},
                                            "books": {"files": [b]}},
                                "tokenizer": "bpe-512", "cache_dir": str(tmp_path / "cache")})
    assert [data.weights_at(i) for i in (1, 2, 3)] == [{"web": 3.0, "books": 1.0}, {"web": 1.0, "books": 1.0},
                                                       {"web": 1.0, "books": 1.0}]  # the last value holds
    prepare(data, tmp_path / "cache", tmp_path, workers=1)
    prepared = open_prepared(tmp_path, data, 16)
    counts = [training_sets(prepared, 0.0, 1, data.weights_at(i))[0].counts.tolist() for i in (1, 2)]
    total = sum(counts[0])
    assert counts[0][1] == pytest.approx(0.75 * total, abs=1) and counts[1][1] == pytest.approx(0.5 * total, abs=1)
    # one fingerprint for every stage (they share data-fingerprint.json): it records the whole schedule
    assert prepared.fingerprint.to_json()["train"]["sources"]["web"]["stage_weights"] == [3.0, 1.0]
