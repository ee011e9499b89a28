"""The train records of a stage: every [log] every_steps steps (and at the last), one read-back of
the losses since the last one (the step's one host sync: nothing is written past a non-finite
loss), and one metrics.jsonl record with loss, lr, pre-clip gradient norm, tokens/s, MFU, measured
and predicted model-state bytes and memory, which the console and the trackers also get.

Throughput counts training only: time spent in evaluations and checkpoints inside the window is
excluded (`paused`), with the GPU synchronised at both ends so queued kernels land on the right side.
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager

import torch
from torch.distributed.tensor import DTensor

from stepc.runtime.guard import RuntimeFailure
from stepc.runtime.loop.console import Console
from stepc.runtime.loop.flops import device_peak_flops, mfu
from stepc.runtime.loop.metrics import MetricsWriter, model_state_bytes, peak_memory
from stepc.runtime.loop.setup import Stage, Trainee, predicted_state_bytes
from stepc.runtime.loop.syncdebug import SyncCheck
from stepc.schema.shapes import model_flops_per_token


class StepLog:
    def __init__(self, st: Stage, metrics: MetricsWriter, console: Console, trainee: Trainee, start: int) -> None:
        self.st, self.metrics, self.console = st, metrics, console
        self.every = st.spec.log.every_steps
        self.predicted = predicted_state_bytes(st, trainee.model)
        self.peak_flops = device_peak_flops(st.device)
        self.per_token = model_flops_per_token(st.spec.model, st.stage.new_layers, st.stage.frozen_layers,
                                               st.spec.step.lora_rank)
        self.grad_norm: torch.Tensor | None = None
        self.restart(start)

    def should_log(self, done: int) -> bool:
        return done % self.every == 0 or done == self.st.stage.steps

    def restart(self, step: int) -> None:
        self.step, self.losses, self.began, self.excluded = step, [], time.perf_counter(), 0.0

    def add(self, loss: torch.Tensor, grad_norm: torch.Tensor) -> None:
        """A finished step's loss and pre-clip gradient norm, still on the device."""
        self.losses.append(loss)
        self.grad_norm = grad_norm

    def read_back(self, done: int) -> float:
        """The losses since the last read-back, checked (a host sync); the last one."""
        values = torch.stack(self.losses).tolist()
        for i, value in enumerate(values):
            if not math.isfinite(value):
                bad = done - len(values) + i + 1
                self.metrics.write(event="nonfinite_loss", stage=self.st.index, step=bad, loss=str(value))
                raise RuntimeFailure(f"non-finite loss {value} at stage {self.st.index} step {bad}; the last good checkpoint "
                                     f"is kept under {self.st.dir} (lower train.lr or check the data, then rerun the stage "
                                     "script to resume)")
        return values[-1]

    def write(self, done: int, loss: float, lr: float, trainee: Trainee, syncs: SyncCheck) -> None:
        """Collective (the measured bytes are summed over ranks): the train record, then a new window."""
        st = self.st
        tps = st.spec.train.global_batch_tokens * (done - self.step) / max(self.seconds(), 1e-9)
        measured = model_state_bytes(trainee.model, trainee.optimizer, st.device)
        memory = peak_memory(st.device)
        utilisation = mfu(tps, self.per_token, self.peak_flops, st.world)
        norm = self.grad_norm.full_tensor() if isinstance(self.grad_norm, DTensor) else self.grad_norm
        checked = {"host_syncs": syncs.take()} if syncs.active else {}
        self.metrics.write(event="train", stage=st.index, step=done, loss=loss, lr=lr,
                           grad_norm=None if norm is None else round(float(norm), 6), tokens_per_s=round(tps, 1),
                           mfu=None if utilisation is None else round(utilisation, 4), model_state_bytes=measured,
                           predicted_model_state_bytes=self.predicted, **memory, **checked)
        self.console.update(done, loss, lr, tps, utilisation, memory["peak_memory_bytes"])
        self.restart(done)

    def seconds(self) -> float:
        return time.perf_counter() - self.began - self.excluded

    @contextmanager
    def paused(self):
        """Time inside is not training time (an evaluation, a checkpoint)."""
        _synchronize(self.st.device)  # queued training kernels belong to the window, not to the pause
        began = time.perf_counter()
        try:
            yield
        finally:
            _synchronize(self.st.device)
            self.excluded += time.perf_counter() - began


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
