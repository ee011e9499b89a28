"""memory.accounting = "device": per-GPU bytes = FSDP-sharded model states + step scalars + activations."""

from __future__ import annotations

from stepc.compiler.load import parse_spec
from stepc.compiler.memory import STEP_SCALAR_BYTES, TRAINED_BYTES, device_costs, exact_costs, exact_layer_params

SPEC = """
[experiment]
name = "dev"
[model]
hidden_size = 256
num_layers = 8
num_attention_heads = 8
num_key_value_heads = 2
vocab_size = 1000
seq_len = 64
[memory]
accounting = "device"
[train]
global_batch_tokens = {batch}
micro_batch_size = 2
precision = "{precision}"
activation_checkpointing = {ckpt}
[launch]
nproc_per_node = {ranks}
[data]
tokenizer = "bpe-1000"
"""


def spec(ranks=4, precision="bf16", ckpt="false"):
    return parse_spec(SPEC.format(ranks=ranks, precision=precision, ckpt=ckpt, batch=64 * 2 * ranks))


def test_model_states_are_sharded_and_step_scalars_replicated():
    s = spec(ranks=4)
    dev, exact = device_costs(s), exact_costs(s)
    for new, old in [(8, 0), (3, 5), (1, 7)]:
        tensors = new * exact.layer_tensors + old * exact.adapter_tensors + exact.fixed_tensors
        states = exact.stage_bytes(new, old) - STEP_SCALAR_BYTES * tensors
        activations = (new + old) * dev.activation_layer_bytes + dev.activation_fixed_bytes
        assert dev.stage_bytes(new, old) == -(-states // 4) + STEP_SCALAR_BYTES * tensors + activations


def test_activation_estimate_per_token_and_layer():
    s = spec(ranks=2, precision="bf16")
    d, inter, kv = 256, round(8 / 3 * 256), 2 * 32
    tokens = 2 * 64
    assert device_costs(s).activation_layer_bytes == tokens * (2 * (6 * d + 2 * kv + 4 * inter) + 8 * 2 * d)
    fp32 = device_costs(spec(ranks=2, precision="fp32"))
    assert fp32.activation_layer_bytes == tokens * (4 * (6 * d + 2 * kv + 4 * inter) + 8 * 2 * d)


def test_activation_checkpointing_keeps_only_layer_inputs():
    plain, ckpt = device_costs(spec(ckpt="false")), device_costs(spec(ckpt="true"))
    assert ckpt.activation_layer_bytes == 2 * 64 * 2 * 256  # tokens x bf16 x d
    assert ckpt.activation_fixed_bytes == plain.activation_fixed_bytes + plain.activation_layer_bytes  # one recomputed layer
    assert ckpt.stage_bytes(8, 0) < plain.stage_bytes(8, 0)


def test_more_ranks_shrink_only_the_sharded_part():
    two, four = device_costs(spec(ranks=2)), device_costs(spec(ranks=4))
    layer, adapter, fixed = exact_layer_params(spec())
    states = TRAINED_BYTES * (8 * layer + fixed)
    assert two.stage_bytes(8, 0) - four.stage_bytes(8, 0) == -(-states // 2) - -(-states // 4)


def test_device_plan_reports_per_gpu_peak():
    from stepc.compiler.plan import make_plan

    s = spec(ranks=4)
    plan = make_plan(s)
    dev = device_costs(s)
    assert plan.peak_bytes == max(dev.stage_bytes(n, o) for n, o in [(plan.layers[0], 0), (plan.layers[1], plan.layers[0])])
    assert plan.vanilla_peak_bytes == dev.stage_bytes(8, 0)
