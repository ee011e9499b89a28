"""Train one stage of a compiled run: the loop, top to bottom.

    verify the manifest -> data and model (setup.py: fresh, grown from stage i-1's export, or [sft]
    init_from's as it is) -> resume, or carry stage i-1's optimizer state
    (checkpointer.py) -> steps: grad accumulation, clipping, adapter merges, and what the components
    ask for (StepLog.should_log, Evaluator.should_eval, Checkpointer.should_save) -> export

The step never waits for the GPU: the loss stays on the device (one scalar all-reduce per step,
enqueued on the stream) and is read back only at log, eval and checkpoint steps, where the losses
since the last read are checked for non-finite values before anything is written.

Launched by stage-<i>.sh through torchrun; every rank runs this file. The tests' fault injection
reaches the loop only through one `Faults` object (faults.py), a no-op outside tests.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist

from stepc.rundir import RunDir
from stepc.runtime.data.batches import device_batches
from stepc.runtime.device import (device_and_backend, init_distributed, set_determinism, set_matmul_precision,
                                  worker_threads)
from stepc.runtime.guard import preflight
from stepc.runtime.init_from import starting_export
from stepc.runtime.loop import checkpoint as ckpt
from stepc.runtime.loop import preempt
from stepc.runtime.loop.checkpointer import Checkpointer
from stepc.runtime.loop.console import Console, echo
from stepc.runtime.loop.eta import RunEta, run_eta
from stepc.runtime.loop.evaluator import Evaluator
from stepc.runtime.loop.faults import Faults
from stepc.runtime.loop.lr import is_merge_step, lr_at
from stepc.runtime.loop.metrics import MetricsWriter, reset_peak_memory
from stepc.runtime.loop.oom import oom_failure
from stepc.runtime.loop.precision import autocast_unsharded
from stepc.runtime.loop.setup import Stage, StageData, Trainee, build, load_data, predicted_state_bytes
from stepc.runtime.loop.steplog import StepLog
from stepc.runtime.loop.syncdebug import SyncCheck
from stepc.runtime.loop.tracking import open_tracking
from stepc.runtime.model.export import write_export
from stepc.runtime.model.lora import merge_and_reinit, reset_optimizer_state


def main(manifest_path: Path, stage_index: int, allow: set[str]) -> int:
    run_dir = manifest_path.parent
    manifest, complete = preflight(manifest_path, stage_index, allow, data=False,  # data: load_data checks it all
                                   world=int(os.environ.get("WORLD_SIZE", "1")))
    if complete:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"stage {stage_index} is already complete ({RunDir(run_dir).final_export(stage_index)}); nothing to do",
                  flush=True)
        return 0
    prev_export = starting_export(run_dir, manifest, stage_index)  # stage i-1's export, or [sft] init_from's

    device, backend = device_and_backend()
    set_determinism(manifest.spec.train.deterministic, device)  # before any CUDA kernel
    set_matmul_precision(manifest.spec.train.precision, device)
    init_distributed(device, backend, manifest.spec.launch.collective_timeout)
    rank, world = dist.get_rank(), dist.get_world_size()
    if device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:  # stepc's launcher sets it (worker_threads)
        torch.set_num_threads(worker_threads(int(os.environ.get("LOCAL_WORLD_SIZE", world))))
    st = Stage(run_dir, manifest.spec, manifest.plan, manifest.stage(stage_index), rank, world, device)
    try:
        train_stage(st, prev_export, allow)
    finally:
        dist.destroy_process_group()
    return 0


def train_stage(st: Stage, prev_export: Path | None, allow: set[str]) -> None:
    data = load_data(st, allow)
    trainee = build(st, prev_export)
    found = ckpt.newest_complete(st.dir)  # (step, path) to resume from, or None
    start = found[0] if found else 0
    tracking = open_tracking(st.run_dir, st.index, start) if st.rank == 0 else None
    for line in tracking.where() if tracking is not None else []:
        echo(f"tracking {line}")
    eta = None
    if st.rank == 0:  # the console's ETA, from what earlier stages recorded and what this one writes
        eta = run_eta(st.plan.stages, st.spec.eval.every_steps, st.spec.train.checkpoint_every,
                      st.spec.eval.max_tokens * len(data.evals), RunDir(st.run_dir).metrics)
    metrics = MetricsWriter(RunDir(st.run_dir).metrics, enabled=st.rank == 0, sink=tracking,
                            watch=eta.observe if eta is not None else None)
    checkpoints = Checkpointer(st, metrics)
    faults = Faults.from_env(st.index)
    if found:
        checkpoints.resume(trainee, found[1], start)
    else:
        if prev_export is not None and st.spec.step.carry_optimizer_state:
            checkpoints.carry_in(trainee)
        faults.starting_optimizer(trainee.model, trainee.optimizer, st.rank)
    evaluator = Evaluator(st, data.evals, metrics)
    try:
        if Loop(st, data, trainee, metrics, checkpoints, evaluator, faults, start, eta).run():
            checkpoints.save_for_next_stage(trainee)
            evaluator.run(trainee.model, st.stage.steps)
            _finish(st, trainee, data, metrics)
            if st.last and tracking is not None:  # the end of the run: where to look at it
                for line in tracking.where():
                    echo(f"tracked {line}")
    finally:
        if tracking is not None:
            tracking.close()


class Loop:
    """The steps of one stage from `start`; run() is False when an agreed stop ended it early."""

    def __init__(self, st: Stage, data: StageData, trainee: Trainee, metrics: MetricsWriter,
                 checkpoints: Checkpointer, evaluator: Evaluator, faults: Faults, start: int,
                 eta: RunEta | None = None) -> None:
        self.st, self.data, self.trainee, self.metrics, self.eta = st, data, trainee, metrics, eta
        self.checkpoints, self.evaluator, self.faults, self.start = checkpoints, evaluator, faults, start
        # ReLoRA restarts only where there are adapters; offset > 0: ReLoRA's adapter phase continues one schedule
        self.reset_every = st.spec.step.relora_reset_every if trainee.adapters else None
        self.offset = st.stage.lr_offset

    def run(self) -> bool:
        st, tr, steps = self.st, self.st.spec.train, self.st.stage.steps
        if self.start == 0:
            launched = os.environ.get("STEPC_STAGE_STARTED", "")  # stage.sh's clock at its start (the ETA's start-up)
            self.metrics.write(event="stage_start", stage=st.index, step=0, layers=st.stage.total_layers, world=st.world,
                               predicted_model_state_bytes=predicted_state_bytes(st, self.trainee.model),
                               plan_peak_bytes=st.stage.peak_bytes,
                               **({"launched": float(launched)} if _is_float(launched) else {}))
        reset_peak_memory(st.device)  # the peak of training, not of the model build
        batches = self.faults.batches(device_batches(
            lambda step, micro: self.data.sampler.batch(st.stage.data_step_offset + step, micro, st.rank, st.world,
                                                        tr.micro_batch_size, st.grad_accum),
            range(self.start, steps), st.grad_accum, st.device))
        console = Console(st.index, st.plan.stages, self.start, enabled=st.rank == 0, eta=self.eta)
        log = StepLog(st, self.metrics, console, self.trainee, self.start)
        syncs = SyncCheck(st.device)  # STEPC_SYNC_DEBUG (bench/gpu.py): host syncs inside a step
        stop_request = RunDir(st.run_dir).stop_request(st.index) if st.rank == 0 else None
        for step in range(self.start, steps):
            lr = lr_at(self.offset + step, tr.lr, tr.warmup_steps, st.stage.nominal_steps, tr.min_lr_ratio,
                       self.reset_every, st.spec.step.restart_warmup_steps, self.offset)
            for group in self.trainee.optimizer.param_groups:
                group["lr"] = lr
            with syncs.step():
                loss, grad_norm = self._step(step, batches)
            done = step + 1
            log.add(self.faults.loss(done, loss), grad_norm)
            if self.reset_every and is_merge_step(self.offset + done, self.reset_every, self.offset):
                self._merge_adapters(done)
            evaluate, save = self.evaluator.should_eval(done), self.checkpoints.should_save(done)
            if log.should_log(done) or evaluate or save:
                last = log.read_back(done)  # the one host sync: nothing is written past a NaN
                if log.should_log(done):
                    log.write(done, last, lr, self.trainee, syncs)
            if evaluate:
                with log.paused():
                    self.evaluator.run(self.trainee.model, done)
            if save:
                with log.paused():
                    self.checkpoints.save(done, self.trainee)
            self.faults.hold(done, self.start, lambda: preempt.requested() is not None
                             or (stop_request is not None and stop_request.exists()))
            if done != steps and preempt.agreed_stop(done, stop_request):  # SIGTERM/SIGINT/SIGUSR1 on any rank
                console.close()
                self.checkpoints.stop(done, self.trainee)
                return False
        console.close()
        if syncs.sites:
            _log(st, "host syncs inside training steps (STEPC_SYNC_DEBUG): "
                 + ", ".join(f"{site} x{n}" for site, n in syncs.sites.most_common(5)))
        return True

    def _step(self, step: int, batches) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step; a CUDA out-of-memory becomes one message naming the keys that fit."""
        try:
            self.faults.before_step(step)
            return _train_step(self.st, self.trainee, batches)
        except torch.OutOfMemoryError:
            found = ckpt.newest_complete(self.st.dir, warn=False)
            kept = f"The last complete checkpoint {found[1]} is kept." if found else "No checkpoint of this stage exists yet."
            raise oom_failure(self.st.spec, self.st.plan, self.st.stage, self.st.device, step + 1, kept) from None

    def _merge_adapters(self, done: int) -> None:
        """ReLoRA restart: fold adapters into the frozen weights, re-init them, reset their optimizer state."""
        st, s, adapters = self.st, self.st.spec.step, self.trainee.adapters
        generator = torch.Generator().manual_seed(st.spec.experiment.seed * 7919 + st.index * 104729 + done)
        merge_and_reinit(adapters, generator)
        params = [p for a in adapters for p in (a.lora_A, a.lora_B)]
        reset_optimizer_state(self.trainee.optimizer, params, s.optimizer_reset, s.prune_ratio)
        self.metrics.write(event="merge", stage=st.index, step=done)


def _train_step(st: Stage, trainee: Trainee, batches) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step; returns the mean loss over ranks and micro-batches and the pre-clip gradient
    norm, both on the device (no host sync: reading them back is the caller's choice)."""
    tr, model, optimizer = st.spec.train, trainee.model, trainee.optimizer
    total = torch.zeros((), dtype=torch.float32, device=st.device)
    for micro in range(st.grad_accum):
        input_ids, labels = next(batches)  # already on the device (stages read on where the previous one stopped)
        if st.sharded:
            model.set_requires_gradient_sync(micro == st.grad_accum - 1)  # reduce-scatter once per step
        with autocast_unsharded(tr.precision, st.device, st.sharded):  # GaLore on a GPU: bf16 like FSDP2's policy
            loss = model(input_ids=input_ids, labels=labels).loss
        (loss.float() / st.grad_accum).backward()
        total += loss.detach().float()
    params = [p for p in model.parameters() if p.requires_grad]
    if tr.grad_clip > 0:
        grad_norm = torch.nn.utils.clip_grad_norm_(params, tr.grad_clip)  # the norm before clipping
    else:
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    optimizer.step()
    optimizer.zero_grad(set_to_none=False)  # keep gradient buffers: they are part of the measured model states
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total / (st.grad_accum * st.world), grad_norm


def _finish(st: Stage, trainee: Trainee, data: StageData, metrics: MetricsWriter) -> None:
    """Merge adapters into an HF export (the next stage's starting point; the last stage's is the result)."""
    state = ckpt.full_model_state(trainee.model)
    final = RunDir(st.run_dir).final_export(st.index)
    if st.rank == 0:
        write_export(state, st.spec, st.stage.total_layers, final, data.tokenizer)
        if st.last:
            export = RunDir(st.run_dir).export
            write_export(state, st.spec, st.stage.total_layers, export, data.tokenizer)
            _log(st, f"exported the trained model to {export} (Hugging Face format, safetensors)")
        metrics.write(event="stage_end", stage=st.index, step=st.stage.steps)
    dist.barrier()


def _is_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _log(st: Stage, message: str) -> None:
    if st.rank == 0:
        echo(message)
