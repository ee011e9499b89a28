"""[train] compile = true: train._prepare compiles every decoder layer in place, before sharding, and
the state-dict keys stay those of the uncompiled model (checkpoints, exports and resumes keep working).

Running the compiled layers is not timed here: inductor needs ~2 minutes of a busy 2-core CPU for a
2-layer model. Measured once by hand (loss identical, largest gradient difference 2e-8), see the
report of issue 11; bench/gpu.py is where the GPU speed-up is measured."""

from __future__ import annotations

import torch


def test_compile_applies_to_every_layer_and_keeps_the_keys(make_run):
    from stepc.runtime.init import meta_fresh_model
    from stepc.runtime.train import Stage, _prepare
    from stepc.schema.manifest import load_manifest

    def prepared(compile_: bool):
        manifest = load_manifest(make_run.compile(f"c{int(compile_)}", train={"compile": compile_},
                                                  launch={"nproc_per_node": 1}))
        st = Stage(make_run.root, manifest.spec, manifest.plan, manifest.plan.stages[0], 0, 1,
                   torch.device("meta"))
        model = meta_fresh_model(st.spec, st.stage.total_layers)
        _prepare(model, st)
        return model

    compiled, plain = prepared(True), prepared(False)
    assert all(layer._compiled_call_impl is not None for layer in compiled.model.layers)
    assert all(layer._compiled_call_impl is None for layer in plain.model.layers)
    assert list(compiled.state_dict()) == list(plain.state_dict())
    assert not any("_orig_mod" in key for key in compiled.state_dict())


def test_deterministic_mode_runs_a_training_step_without_warn_only():
    """[train] deterministic = true: use_deterministic_algorithms(True) with no warn_only, so an op
    without a deterministic kernel would raise; the runtime's model, loss and AdamW have one on CPU."""
    from test_gpu_metrics import small_spec

    from stepc.runtime.device import set_determinism
    from stepc.runtime.model import fresh_model

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
