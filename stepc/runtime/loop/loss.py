"""Causal-LM loss straight from the last hidden states: LM head + cross-entropy, chunk by chunk.

transformers computes `logits = lm_head(h)` for the whole micro-batch and upcasts them to fp32
before the cross-entropy: [B*S, V] fp32 logits plus their softmax and gradient, about 4.9 GB at
8 x 1024 tokens and GPT-2's 50257-token vocabulary, the largest tensors of a training step.

`linear_cross_entropy` never holds more than one chunk of logits. Its forward pass walks the tokens
in chunks: logits of the chunk (compute dtype, upcast to fp32), log-sum-exp, the loss, and right
away the chunk's gradients - d(loss)/d(logits) = softmax - onehot, then d/dh = g @ W and d/dW =
g^T @ h - so the chunk's logits die before the next chunk starts. Backward only scales the stored
gradients by the incoming one. The FLOPs are the unfused forward + backward's (three matmuls per
token), nothing is recomputed.

Every matmul runs in the compute dtype (bf16 on a GPU), like autograd's own: the head's weight
gradient is summed over chunks in an fp32 buffer, each chunk's GEMM accumulating in fp32 inside
cuBLAS and writing fp32 straight into that buffer (addmm with out_dtype), so no chunk is rounded to
bf16 before the sum. Upcasting the operands to fp32 instead would run 2-4% of a step's FLOPs on the
fp32 units at a fraction of the tensor cores' rate. Where torch has no fp32-output kernel for the
compute dtype (CPU bf16), the chunk's product is rounded once to the compute dtype and then summed
in fp32.

Why hand-written: the fused linear + cross-entropy kernels of well-kept packages (Liger-Kernel,
Apple's cut-cross-entropy) are Triton-only, so they cannot run (or be tested) on CPU, and the
runtime must be correct on both. This is plain PyTorch and works on any device and dtype.
"""

from __future__ import annotations

import functools

import torch

from stepc.schema.shapes import IGNORE_INDEX, LOSS_CHUNK_TOKENS

CHUNK_TOKENS = LOSS_CHUNK_TOKENS  # tokens whose logits exist at a time (the device accounting counts them)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int,
                need_grad: bool) -> torch.Tensor:
        n = hidden.shape[0]
        valid_all = targets != IGNORE_INDEX
        count = valid_all.sum().clamp(min=1).to(torch.float32)
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_h = torch.empty_like(hidden) if need_grad and ctx.needs_input_grad[0] else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) \
            if need_grad and ctx.needs_input_grad[1] else None
        for start in range(0, n, chunk):
            h = hidden[start:start + chunk]
            t = targets[start:start + chunk]
            valid = valid_all[start:start + chunk]
            logits = (h @ weight.t()).float()  # the compute dtype's rounding, as lm_head(h).float()
            lse = torch.logsumexp(logits, dim=-1)
            safe_t = t.clamp(min=0)
            picked = logits.gather(1, safe_t[:, None]).squeeze(1)
            loss += torch.where(valid, lse - picked, 0.0).sum()
            if grad_h is None and grad_w is None:
                continue
            probs = logits.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
            probs[torch.arange(len(t), device=t.device), safe_t] -= 1.0
            probs *= valid[:, None] / count
            g = probs.to(hidden.dtype)
            if grad_h is not None:
                grad_h[start:start + chunk] = g @ weight
            if grad_w is not None:
                accumulate_matmul_(grad_w, g.t(), h)  # fp32 sum over chunks, GEMMs in the compute dtype
        if grad_w is not None:
            grad_w = grad_w.to(weight.dtype)  # what autograd would hand the weight
        ctx.save_for_backward(grad_h if grad_h is not None else torch.empty(0),
                              grad_w if grad_w is not None else torch.empty(0))
        ctx.has = (grad_h is not None, grad_w is not None)
        return loss / count

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_h, grad_w = ctx.saved_tensors
        dh = grad_h * grad_out.to(grad_h.dtype) if ctx.has[0] else None
        dw = grad_w * grad_out.to(grad_w.dtype) if ctx.has[1] else None
        return dh, dw, None, None, None


def accumulate_matmul_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a @ b, with `a` and `b` in their own (compute) dtype and `acc` in fp32."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
    elif acc.is_cuda and _fp32_output_gemm(acc.device, a.dtype):  # cuBLAS: fp32 accumulation and output
        torch.ops.aten.addmm.dtype_out(acc, a, b, acc.dtype, out=acc)
    else:
        acc.add_(a @ b)


@functools.cache
def _fp32_output_gemm(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether this torch build has addmm's out_dtype kernel for `dtype` on `device` (added in torch
    2.8, CUDA only). Asked once per device: a build without it falls back to the rounded sum
    instead of failing the first training step."""
    try:
        acc = torch.zeros(8, 8, dtype=torch.float32, device=device)
        one = torch.ones(8, 8, dtype=dtype, device=device)
        torch.ops.aten.addmm.dtype_out(acc, one, one, torch.float32, out=acc)  # a missing kernel raises here
        return True
    except (RuntimeError, NotImplementedError, AttributeError):
        return False


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                         chunk_tokens: int = CHUNK_TOKENS) -> torch.Tensor:
    """Mean next-token cross-entropy of `hidden` [B, S, d] under the LM head `weight` [V, d].

    Same value as transformers' causal-LM loss with `labels` [B, S] (position s predicts token s+1;
    IGNORE_INDEX labels do not count), without materialising [B*S, V] logits.
    """
    h = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    t = labels[:, 1:].reshape(-1).long()
    need_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    return _LinearCrossEntropy.apply(h, weight, t, chunk_tokens, need_grad)
