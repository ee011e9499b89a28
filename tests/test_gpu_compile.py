"""[train] compile = true and activation_checkpointing: each decoder layer's forward is wrapped as
checkpoint(compile(forward)) before FSDP2 shards it (model.wrap_decoder_layers), so FSDP's hooks stay
outside the compiled graph and the state-dict keys are those of the plain model; and the compiled,
checkpointed stage trains on 2 FSDP2 ranks to the eager run's losses and weights."""

from __future__ import annotations

import pytest
import torch
from conftest import check_ok, load_weights, read_metrics, run_stage


def test_compile_and_checkpointing_wrap_forward_only_and_keep_the_keys(make_run):
    from stepc.runtime.model.materialise import meta_fresh_model
    from stepc.runtime.loop.setup import Stage
    from stepc.runtime.loop.setup import prepare as _prepare
    from stepc.schema.manifest import load_manifest

    def prepared(on: bool):
        manifest = load_manifest(make_run.compile(f"c{int(on)}", train={"compile": on, "activation_checkpointing": on},
                                                  launch={"nproc_per_node": 1}))
        st = Stage(make_run.root, manifest.spec, manifest.plan, manifest.plan.stages[0], 0, 1,
                   torch.device("meta"))
        model = meta_fresh_model(st.spec, st.stage.total_layers)
        _prepare(model, st)
        return model

    wrapped, plain = prepared(True), prepared(False)
    for layer in wrapped.model.layers:
        assert "forward" in vars(layer)  # the instance's own forward: checkpoint(compiled forward)
        assert layer._compiled_call_impl is None  # the module call (with its hooks) is not compiled
    assert all("forward" not in vars(layer) for layer in plain.model.layers)
    assert list(wrapped.state_dict()) == list(plain.state_dict())
    assert not any("_orig_mod" in key or "checkpoint" in key for key in wrapped.state_dict())


def test_compiled_checkpointed_stage_trains_like_the_eager_one(full_run, make_run):
    """The session's eager run against the same spec with compile and activation checkpointing, both on
    2 FSDP2 ranks (inductor on the CPU: ~30 s of compilation, one graph shared by the layers, fullgraph).
    Tolerance: a few times what was measured between the two (logged losses within 2e-6 relative; each
    exported tensor within 4e-5 of its norm, the embedding's rows of rare tokens the largest: AdamW
    magnifies rounding where a gradient is near zero), far below what a wrong wrapping changes."""
    run = make_run.compile("rt", train={"compile": True, "activation_checkpointing": True})
    check_ok(run_stage(run, 1))
    losses = [{m["step"]: m["loss"] for m in read_metrics(r) if m["event"] == "train" and m["stage"] == 1}
              for r in (run, full_run)]
    assert losses[0].keys() == losses[1].keys() and len(losses[0]) >= 2
    for step, loss in losses[0].items():
        assert loss == pytest.approx(losses[1][step], rel=2e-6), (step, loss, losses[1][step])
    a = load_weights(run / "checkpoints" / "stage-1" / "final")
    b = load_weights(full_run / "checkpoints" / "stage-1" / "final")
    assert sorted(a) == sorted(b)
    for key in a:
        assert float((a[key] - b[key]).norm() / b[key].norm()) < 2e-4, key


def test_deterministic_mode_runs_a_training_step_without_warn_only():
    """[train] deterministic = true: use_deterministic_algorithms(True) with no warn_only, so an op
    without a deterministic kernel would raise; the runtime's model, loss and AdamW have one on CPU."""
    from test_gpu_metrics import small_spec

    from stepc.runtime.device import set_determinism
    from eager_reference import fresh_model

    spec = small_spec(vocab_size=512, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                      num_key_value_heads=2, seq_len=32, num_layers=2)
    x = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(0))
    set_determinism(True, torch.device("cpu"))
    try:
        assert torch.are_deterministic_algorithms_enabled()
        assert not torch.is_deterministic_algorithms_warn_only_enabled()
        weights = []
        for _ in range(2):
            model = fresh_model(spec, 2, 1)
            opt = torch.optim.AdamW(model.parameters(), lr=1e-2, foreach=True)
            model(input_ids=x, labels=x).loss.backward()
            opt.step()
            weights.append(model.model.embed_tokens.weight.detach().clone())
        assert torch.equal(weights[0], weights[1])
    finally:
        torch.use_deterministic_algorithms(False)
