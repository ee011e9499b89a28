"""GaLore's memory model (`stepc.compiler.memory.galore_bytes`, the plan's GaLore peak) against a count
of the real thing: the runtime's model and its `GaLoreAdamW` (galore-torch, a hard test dependency),
one optimizer step on CPU, then every byte of weights, gradients, optimizer-state tensors and the
projectors' orthogonal matrices, read off the tensors. fp32 on one rank is where the model is exact
(weight + gradient = 8 bytes per parameter, the same as 16-bit weight + gradient + fp32 master).
"""

from __future__ import annotations

import pytest
import torch
from test_methods import spec_for

from stepc.compiler.load import parse_spec
from stepc.compiler.plan import make_plan


def _measured_bytes(spec) -> tuple[int, dict[str, int]]:
    from galore_torch.galore_projector import GaLoreProjector

    from eager_reference import fresh_model
    from stepc.runtime.loop.setup import make_optimizer as _optimizer

    torch.manual_seed(0)
    model = fresh_model(spec, spec.model.num_layers, 0)
    optimizer = _optimizer(model, spec, torch.device("cpu"))
    batch = torch.randint(0, spec.model.vocab_size, (2, spec.model.seq_len))
    model(input_ids=batch, labels=batch).loss.backward()
    optimizer.step()
    parts = {"weights": 0, "grads": 0, "moments": 0, "projectors": 0}
    seen: set[int] = set()
    for p in model.parameters():  # tied embeddings: one tensor, counted once
        if id(p) in seen:
            continue
        seen.add(id(p))
        parts["weights"] += p.numel() * p.element_size()
        parts["grads"] += p.grad.numel() * p.grad.element_size()
    for state in optimizer.state.values():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                assert key in ("exp_avg", "exp_avg_sq"), key  # GaLoreAdamW's step is a Python int
                parts["moments"] += value.numel() * value.element_size()
            elif isinstance(value, GaLoreProjector):
                parts["projectors"] += value.ortho_matrix.numel() * value.ortho_matrix.element_size()
    return sum(parts.values()), parts


@pytest.mark.parametrize("tie", [False, True])
def test_galore_plan_peak_equals_the_counted_optimizer_state(tie):
    text = spec_for("galore")
    if tie:
        text = text.replace("seq_len = 64", "seq_len = 64\ntie_embeddings = true")
    spec = parse_spec(text)
    assert spec.model.tie_embeddings is tie and spec.train.precision == "fp32"
    plan = make_plan(spec)
    (stage,) = plan.stages
    measured, parts = _measured_bytes(spec)
    assert parts["projectors"] > 0 and parts["moments"] > 0, parts  # GaLore really projected something
    assert stage.peak_bytes == plan.peak_bytes == measured, (stage.peak_bytes, measured, parts)
    # and it is below the plain AdamW count of the same model (16 bytes per parameter)
    assert measured < 4 * parts["weights"]


def test_the_runtimes_measured_bytes_count_galores_projectors():
    """`model_state_bytes` (what metrics.jsonl and `stepc report` call measured) equals the count above."""
    import socket

    import torch.distributed as dist

    from stepc.runtime.loop.metrics import model_state_bytes
    from eager_reference import fresh_model
    from stepc.runtime.loop.setup import make_optimizer as _optimizer

    spec = parse_spec(spec_for("galore"))
    expected, _ = _measured_bytes(spec)
    torch.manual_seed(0)
    model = fresh_model(spec, spec.model.num_layers, 0)
    optimizer = _optimizer(model, spec, torch.device("cpu"))
    batch = torch.randint(0, spec.model.vocab_size, (2, spec.model.seq_len))
    model(input_ids=batch, labels=batch).loss.backward()
    optimizer.step()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", rank=0, world_size=1, init_method=f"tcp://127.0.0.1:{port}")
    try:
        assert model_state_bytes(model, optimizer, torch.device("cpu")) == expected == make_plan(spec).peak_bytes
    finally:
        dist.destroy_process_group()
