"""Validation perplexity during a stage: when (every eval.every_steps, and at the end) and how (the
same blocks in the same order as `stepc eval`, summed on the device, one all-reduce per set)."""

from __future__ import annotations

import math
import time
from typing import Any

import torch
import torch.distributed as dist

from stepc.runtime.data.evalsets import iter_eval_batches
from stepc.runtime.loop.console import echo
from stepc.runtime.loop.metrics import MetricsWriter, loss_sums
from stepc.runtime.loop.precision import autocast_unsharded
from stepc.runtime.loop.setup import Stage


class Evaluator:
    def __init__(self, st: Stage, evals: dict[str, Any], metrics: MetricsWriter) -> None:
        self.st, self.evals, self.metrics = st, evals, metrics

    def should_eval(self, done: int) -> bool:
        """A periodic evaluation (the stage's last step gets the final one, after the loop)."""
        return done % self.st.spec.eval.every_steps == 0 and done != self.st.stage.steps

    @torch.no_grad()
    def run(self, model, step: int) -> dict[str, float]:
        """Collective: the perplexity of every eval set, written to metrics.jsonl and printed by rank 0."""
        st = self.st
        began = time.perf_counter()
        model.eval()
        result = {}
        for name, (blocks, indices) in self.evals.items():
            total, count = eval_sums(st, model, blocks, indices).tolist()
            if count > 0:
                result[name] = math.exp(total / count)
        model.train()
        if result:
            self.metrics.write(event="eval", stage=st.index, step=step, **{f"ppl_{k}": round(v, 4) for k, v in result.items()},
                               seconds=round(time.perf_counter() - began, 3))  # for the ETA (eta.py)
            if st.rank == 0:
                echo(f"eval stage {st.index} step {step}: " + ", ".join(f"{k} ppl {v:.2f}" for k, v in result.items()))
        return result


def eval_sums(st: Stage, model, blocks, indices) -> torch.Tensor:
    """Collective: [sum of token losses, tokens] of one eval set over all ranks, on st.device (NCCL
    reduces only GPU tensors)."""
    batches = iter_eval_batches(blocks, st.spec.train.micro_batch_size, st.rank, st.world,
                                st.spec.eval.max_tokens, indices)
    with autocast_unsharded(st.spec.train.precision, st.device, st.sharded):
        sums = loss_sums(model, batches, st.device)
    dist.all_reduce(sums)
    return sums
