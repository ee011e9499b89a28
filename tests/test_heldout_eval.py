"""The held-out split and `stepc eval`'s perplexity, checked against computations that share no code
with them.

The runtime and `stepc eval` both take their sets from `eval_sets` and their loss from `loss_sums`,
so their agreement (test_methods.py) proves nothing about either. Here:
- the runtime's sampler, over a whole epoch, never hands out a held-out block (by index and by content);
- `stepc eval` on a fixed tiny model (trained in-process for a few steps, exported with the runtime's
  exporter) equals a plain PyTorch loop over the same blocks with the cross-entropy written by hand.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from test_methods import spec_for

from stepc.cli import main
from stepc.compiler.load import parse_spec
from stepc.rundir import RunDir
from stepc.runtime.data.prepared import open_prepared, training_sets
from stepc.runtime.data.sampler import BlockSampler, holdout_split


@pytest.fixture(scope="module")
def compiled(tmp_path_factory, small_corpus):
    out = tmp_path_factory.mktemp("heldout")
    spec_path = out / "spec.toml"
    text = spec_for("vanilla", steps=8, corpus=small_corpus, name="heldout")
    spec_path.write_text(text.replace("max_tokens = 2048", "max_tokens = 1600"))  # 25 blocks: 3 batches of 8 + 1
    assert main(["compile", str(spec_path), "--out", str(out)]) == 0
    run_dir = out / "heldout"
    spec = parse_spec(spec_path.read_text())
    assert main(["data", "prepare", str(run_dir), "--quiet"]) == 0
    prepared = open_prepared(run_dir, spec.data, spec.model.seq_len)
    return run_dir, spec, prepared, prepared.tokenizer, prepared.train["train"], prepared.validation


def test_the_sampler_never_hands_out_a_heldout_block(compiled):
    _, spec, prepared, _, train, _ = compiled
    runtime_sampler, sets = training_sets(prepared, spec.data.holdout_fraction, spec.experiment.seed)
    heldout_blocks, heldout_idx = sets["heldout"]
    assert heldout_blocks is train
    n = len(train)
    train_idx, _ = holdout_split(n, spec.data.holdout_fraction, spec.experiment.seed)
    assert len(heldout_idx) == round(spec.data.holdout_fraction * n) > 0  # 1% of the blocks, as documented

    # every block the sampler gives 2 ranks x 2 micro-batches over one epoch and a bit (as the runtime builds it)
    sampler = BlockSampler(train, spec.experiment.seed, indices=train_idx)
    assert np.array_equal(runtime_sampler.block_ids(0, 0, 0, 2, 4, 2), sampler.block_ids(0, 0, 0, 2, 4, 2))
    seen: list[int] = []
    per_step = 2 * 2 * 4
    for step in range(n // per_step + 2):
        for micro in range(2):
            for rank in range(2):
                seen += sampler.block_ids(step, micro, rank, 2, 4, 2).tolist()
    assert set(seen) == set(range(n)) - set(heldout_idx.tolist())  # all training blocks, none held out
    # and by content: no held-out block's tokens are a training block's tokens
    trained_rows = {train[i].tobytes() for i in set(seen)}
    assert not any(train[i].tobytes() in trained_rows for i in heldout_idx)


def _fixed_model(spec, train, train_idx):
    """A deterministic tiny model, trained 6 AdamW steps so its predictions depend on the input."""
    from eager_reference import fresh_model

    model = fresh_model(spec, spec.model.num_layers, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for step in range(6):
        x = torch.from_numpy(np.asarray(train[train_idx[step * 4:(step + 1) * 4]], np.int64))
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


def _perplexity_by_hand(model, blocks: np.ndarray) -> float:
    """exp(mean over every predicted token of -log p(next token)), all blocks in one float64 sum."""
    x = torch.from_numpy(np.asarray(blocks, np.int64))
    with torch.no_grad():
        logits = model(input_ids=x).logits.double()
    logp = torch.log_softmax(logits[:, :-1], dim=-1)
    nll = -logp.gather(-1, x[:, 1:, None]).squeeze(-1)
    return math.exp(nll.sum().item() / nll.numel())


def test_stepc_eval_perplexity_equals_an_independent_computation(compiled):
    from stepc.runtime.model.export import write_export

    run_dir, spec, _, tok, train, named = compiled
    train_idx, heldout_idx = holdout_split(len(train), spec.data.holdout_fraction, spec.experiment.seed)
    model = _fixed_model(spec, train, train_idx)
    write_export({k: v.detach().clone() for k, v in model.state_dict().items()}, spec, spec.model.num_layers,
                 RunDir(run_dir).export, tok)

    assert main(["eval", str(run_dir)]) == 0
    reported = json.loads(RunDir(run_dir).eval_result.read_text())["perplexity"]

    # the documented sets: the held-out blocks, and all of each validation set, cut at eval.max_tokens
    first = spec.eval.max_tokens // spec.model.seq_len
    assert len(heldout_idx) > first and first % 8 != 0  # `stepc eval` batches 8 blocks: a partial last batch
    expected = {"heldout": _perplexity_by_hand(model, train[heldout_idx[:first]]),
                "val": _perplexity_by_hand(model, named["val"][np.arange(first)])}
    assert set(reported) == set(expected)
    for name, value in expected.items():
        assert value < 0.8 * spec.model.vocab_size  # the fixed model is not uniform: the blocks matter
        assert reported[name] == pytest.approx(value, rel=1e-6), name
    # the same model scores training blocks differently (so a set drawn from them would be noticed)
    assert _perplexity_by_hand(model, train[train_idx[:first]]) != pytest.approx(expected["heldout"], rel=1e-4)
