"""MFU's pieces that run on CPU: the FLOPs formula (runtime/loop/flops.py) against an independent count of
a real forward + backward (torch.utils.flop_counter), the exact peak-FLOPs lookup by device name, and
the chunked loss's value and gradients against transformers' own loss."""

from __future__ import annotations

import pytest
import torch
from conftest import spec_text
from torch.utils import flop_counter as fc

from stepc.runtime.loop.flops import GPU_PEAK_BF16, mfu, peak_flops
from stepc.schema.shapes import adapter_params, layer_matmul_params, model_flops_per_token

aten = torch.ops.aten


def small_spec(**model):
    from stepc.compiler.load import parse_spec

    return parse_spec(spec_text({"experiment": {"name": "t"}, "model": model, "memory": {}, "step": {"lora_rank": 8},
                                 "data": {"tokenizer": f"bpe-{model['vocab_size']}"}}))


def _counted_flops(model, x) -> int:
    """Matmul FLOPs of one training forward + backward, as FlopCounterMode counts them. Its table
    lacks ops the CPU run uses, registered here with its own formulas: the CPU flash-attention
    kernel (and its backward) and the in-place addmm_ that accumulates the LM head's gradient."""
    def cpu_sdpa(query, key, value, *args, out_shape=None, **kwargs):
        return fc.sdpa_flop_count(query, key, value)

    def cpu_sdpa_backward(grad_out, query, key, value, *args, out_shape=None, **kwargs):
        # model FLOPs: the four gradient matmuls, twice the forward. (torch's sdpa_backward_flop_count
        # adds flash attention's recomputation of Q K^T, a hardware cost MFU leaves out.)
        return 2 * fc.sdpa_flop_count(query, key, value)

    def addmm_(acc, a, b, *args, out_shape=None, **kwargs):
        return fc.mm_flop(a, b)

    custom = {aten._scaled_dot_product_flash_attention_for_cpu: cpu_sdpa,
              aten._scaled_dot_product_flash_attention_for_cpu_backward: cpu_sdpa_backward,
              aten.addmm_: addmm_}  # FlopCounterMode wraps each: they receive shapes
    with fc.FlopCounterMode(display=False, custom_mapping=custom) as counter:
        model(input_ids=x, labels=x).loss.backward()
    return counter.get_total_flops()


@pytest.mark.parametrize("new,old,vocab,pad", [(3, 0, 1000, 1), (1, 2, 1000, 1), (2, 1, 600, 1024)])
def test_flops_per_token_matches_a_counted_forward_backward(new, old, vocab, pad):
    """pad: a padded vocabulary (600 -> 1024 rows, far more than the tolerance) and MLP width
    (344 -> 1024) are counted as the matmuls the model runs."""
    from stepc.runtime.model.lora import apply_adapters
    from eager_reference import fresh_model

    spec = small_spec(vocab_size=vocab, hidden_size=128, intermediate_size=344, num_attention_heads=4,
                      num_key_value_heads=2, seq_len=128, num_layers=new + old, vocab_multiple_of=pad,
                      intermediate_multiple_of=pad)
    cfg = spec.model
    model = fresh_model(spec, new + old, 1)
    linear = [m for name, m in model.model.layers[0].named_modules() if isinstance(m, torch.nn.Linear)]
    assert layer_matmul_params(cfg) == sum(m.weight.numel() for m in linear)  # P: the real seven maps
    if old:  # a grown stage: the lower layers frozen behind rank-8 adapters
        apply_adapters(model, list(range(old)), 8, 16, torch.Generator().manual_seed(0))
        # E against the real adapters' element counts, and the adapters' term: 6 FLOPs per element per token
        # (the 1% tolerance below would hide a wrong adapter term: it is ~1% of this stage's FLOPs)
        adapters = [p for name, p in model.model.layers[0].named_parameters() if "lora_" in name]
        assert len(adapters) == 14 and adapter_params(cfg, 8) == sum(p.numel() for p in adapters)
        assert model_flops_per_token(cfg, new, old, 8) - model_flops_per_token(cfg, new, old, 0) == 6 * old * adapter_params(cfg,
                                                                                                                             8)
    x = torch.randint(0, vocab, (2, 128))
    counted = _counted_flops(model, x)
    predicted = model_flops_per_token(cfg, new, old, 8) * x.numel()
    # within 1%: the head sees 127 of 128 positions (the last one predicts nothing)
    assert predicted == pytest.approx(counted, rel=0.01)


def test_mfu_is_achieved_flops_over_the_peak_of_every_gpu():
    # by hand: 26,000 tokens/s x 6e9 FLOPs/token = 1.56e14 FLOP/s, on 2 A100s of 312e12 each = 6.24e14: 25%
    assert mfu(26_000, 6e9, peak_flops("NVIDIA A100-SXM4-80GB"), 2) == pytest.approx(0.25, rel=1e-12)
    # 1 H100 SXM (989.4e12): 50,000 x 9.894e9 = 4.947e14 FLOP/s, half the peak
    assert mfu(50_000, 9.894e9, peak_flops("NVIDIA H100 80GB HBM3"), 1) == pytest.approx(0.5, rel=1e-12)
    assert mfu(50_000, 9.894e9, peak_flops("Tesla T4"), 1) is None  # no peak known: no MFU, not a guess
    assert mfu(50_000, 9.894e9, None, 1) is None


def test_peak_flops_exact_names_only():
    assert peak_flops("NVIDIA H100 80GB HBM3") == 989.4e12
    assert peak_flops("NVIDIA H100 PCIe") == 756e12  # not the SXM figure
    assert peak_flops("NVIDIA H100 NVL") == 835.5e12
    assert peak_flops("NVIDIA L40") == 181.05e12 and peak_flops("NVIDIA L4") == 121e12  # "L4" is not "L40"
    assert peak_flops("NVIDIA A100-SXM4-40GB") == peak_flops("NVIDIA A100 80GB PCIe") == 312e12
    assert peak_flops("NVIDIA H100") is None and peak_flops("Tesla T4") is None and peak_flops(None) is None
    assert all(name.startswith("NVIDIA ") for name in GPU_PEAK_BF16)


def test_chunked_loss_equals_transformers_loss_and_gradients():
    from stepc.runtime.loop.loss import IGNORE_INDEX, linear_cross_entropy

    torch.manual_seed(0)
    hidden = torch.randn(2, 37, 16, requires_grad=True)
    weight = torch.randn(50, 16, requires_grad=True)
    labels = torch.randint(0, 50, (2, 37))
    labels[1, 5:9] = IGNORE_INDEX
    ours = linear_cross_entropy(hidden, weight, labels, chunk_tokens=7)  # chunks that do not divide 72
    (2 * ours).backward()
    got = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    logits = hidden @ weight.t()
    ref = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 50), labels[:, 1:].reshape(-1),
                                            ignore_index=IGNORE_INDEX)
    (2 * ref).backward()
    torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(got[0], hidden.grad)
    torch.testing.assert_close(got[1], weight.grad)


def test_chunked_loss_runs_every_matmul_in_the_compute_dtype():
    """Under bf16 every matmul of the chunked loss (logits, input gradient, the head's weight gradient)
    takes bf16 operands, as autograd's own would: an fp32 upcast runs those FLOPs (2-4% of a step)
    at a fraction of the tensor cores' rate. The result still matches fp64 autograd to bf16 accuracy."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from stepc.runtime.loop.loss import linear_cross_entropy

    matmuls = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm):
                operands = args[-2:]  # (a, b) of mm, (a, b) after addmm's input
                matmuls.append((func.overloadpacket.__name__, [t.dtype for t in operands]))
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    hidden = torch.randn(2, 41, 32, dtype=torch.bfloat16, requires_grad=True)
    weight = (0.1 * torch.randn(300, 32)).to(torch.bfloat16).requires_grad_()
    labels = torch.randint(0, 300, (2, 41))
    with Record():
        loss = linear_cross_entropy(hidden, weight, labels, chunk_tokens=16)  # 80 positions: 5 chunks
    loss.backward()
    assert len(matmuls) == 3 * 5  # logits, d/dh and d/dW for every chunk
    assert all(dtypes == [torch.bfloat16, torch.bfloat16] for _, dtypes in matmuls), matmuls
    h64, w64 = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    ref = torch.nn.functional.cross_entropy((h64 @ w64.t())[:, :-1].reshape(-1, 300), labels[:, 1:].reshape(-1))
    ref.backward()
    assert abs(loss.item() - ref.item()) / ref.item() < 1e-2
    for got, want in ((hidden.grad, h64.grad), (weight.grad, w64.grad)):
        assert got.dtype == torch.bfloat16
        assert float((got.double() - want).norm() / want.norm()) < 1e-2


def test_out_of_memory_message_names_prediction_capacity_and_the_keys_that_fit(make_run):
    from stepc.runtime.loop.oom import oom_failure
    from stepc.schema.manifest import load_manifest

    manifest = load_manifest(make_run.compile("rt", memory={"accounting": "device"}))
    stage = manifest.plan.stages[0]
    message = str(oom_failure(manifest.spec, manifest.plan, stage, torch.device("cpu"), 3, "kept."))
    assert "stage 1 step 3" in message and f"{stage.peak_bytes / 1e9:.3f} GB" in message
    for key in ("train.micro_batch_size", "train.activation_checkpointing", "train.compile"):
        assert key in message
