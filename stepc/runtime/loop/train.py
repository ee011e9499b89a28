"""Train one stage of a compiled run: the loop, top to bottom.

    load + verify manifest -> data -> model on `meta` (fresh, or grown from stage i-1's export, or [sft] init_from's as it is)
    -> [checkpoint(compile(forward)) per layer] -> fully_shard per layer + root (HSDP: on a nodes x ranks mesh) -> each rank fills its shards (init.py)
    -> AdamW -> resume from the newest complete checkpoint
    -> steps (grad accumulation, clipping, adapter merges, eval, checkpoints) -> export

The step never waits for the GPU: the loss stays on the device (one scalar all-reduce per step,
enqueued on the stream) and is read back only at log, eval and checkpoint steps, where the losses
since the last read are checked for non-finite values before anything is written.

Launched by stage-<i>.sh through torchrun; every rank runs this file.

Fault injection (tests only): STEPC_FAULT_NONFINITE_AT_STEP=N treats the loss of (1-based) step N
as NaN, exercising the non-finite-loss stop without waiting for a real divergence;
STEPC_FAULT_OOM_AT_STEP=N raises torch.OutOfMemoryError in step N, as a CUDA allocation would.
STEPC_FAULT_HOLD_AFTER_STEP=I:N holds every rank after step N of stage I until it is told to stop (faults.py).
STEPC_DUMP_OPTIMIZER_AT_START=FILE writes the optimizer state a fresh stage starts with (after any
carry) to FILE, so tests can compare carried moments with the previous stage's bit for bit.
"""

from __future__ import annotations

import math
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from stepc.rundir import RunDir
from stepc.runtime.model import carry
from stepc.runtime.loop import preempt
from stepc.runtime.loop import checkpoint as ckpt
from stepc.runtime.data.batches import device_batches
from stepc.runtime.loop.console import Console, echo
from stepc.runtime.data.prepared import open_prepared, training_sets
from stepc.runtime.device import device_and_backend, init_distributed, set_determinism, set_matmul_precision
from stepc.runtime.data.evalsets import iter_eval_batches
from stepc.runtime.model.export import write_export
from stepc.runtime.loop.faults import hold_after_step
from stepc.runtime.loop.flops import device_peak_flops, mfu
from stepc.runtime.guard import RuntimeFailure, carry_source_missing, check_data_fingerprint, preflight
from stepc.runtime.init_from import starting_export
from stepc.runtime.model.materialise import init_fresh, meta_fresh_model, meta_grown_model
from stepc.runtime.model.lora import LoRALinear, merge_and_reinit, reset_optimizer_state
from stepc.runtime.loop.lr import is_merge_step, lr_at
from stepc.runtime.model.llama import wrap_decoder_layers
from stepc.runtime.loop.metrics import MetricsWriter, loss_sums, model_state_bytes, peak_memory, reset_peak_memory
from stepc.runtime.loop.oom import oom_failure
from stepc.runtime.loop.precision import autocast_unsharded
from stepc.runtime.data.instructions import InstructionSampler, open_examples
from stepc.runtime.data.sampler import BlendSampler, BlockSampler
from stepc.runtime.loop.syncdebug import SyncCheck
from stepc.runtime.loop.tracking import open_tracking
from stepc.schema.plan import Plan, StagePlan
from stepc.schema.shapes import model_flops_per_token
from stepc.schema.spec import Spec


@dataclass
class Stage:
    """Everything the loop needs about this stage, resolved once from the manifest."""

    run_dir: Path
    spec: Spec
    plan: Plan
    stage: StagePlan  # this stage's part of the plan
    rank: int
    world: int
    device: torch.device
    adapters: list[LoRALinear] = field(default_factory=list)
    tokenizer: Any = None  # tokenizers.Tokenizer, saved beside the export

    @property
    def index(self) -> int:
        return self.stage.index

    @property
    def dir(self) -> Path:
        return RunDir(self.run_dir).stage_dir(self.index)

    @property
    def sharded(self) -> bool:
        """FSDP2 unless there is nothing to shard: one CPU rank runs the plain module (FSDP2's
        all-gathers and DTensor dispatch cost ~35% there for no memory gain). A single GPU keeps
        FSDP2 for its bf16 mixed-precision policy. GaLore is never sharded (not FSDP-aware)."""
        if not self.spec.method.shards:
            return False
        return self.world > 1 or self.device.type == "cuda"

    @property
    def grad_accum(self) -> int:
        tr, seq = self.spec.train, self.spec.model.seq_len
        return tr.global_batch_tokens // (seq * tr.micro_batch_size * self.world)

    @property
    def replicas(self) -> int:
        """Copies of the model states across the job: the nodes under [launch] sharding = "hybrid"
        (HSDP: each node shards one copy over its own ranks), else 1 (FSDP over every rank)."""
        if self.spec.launch.sharding != "hybrid" or not self.sharded:
            return 1
        local = int(os.environ.get("LOCAL_WORLD_SIZE", self.world))
        if self.world % local:
            raise RuntimeFailure(f"sharding = \"hybrid\" needs the same number of ranks on every node; {self.world} ranks "
                                 f"do not split into nodes of {local}")
        return self.world // local


def main(manifest_path: Path, stage_index: int, allow: set[str]) -> int:
    run_dir = manifest_path.parent
    manifest, complete = preflight(manifest_path, stage_index, allow, data=False,  # data: _load_data checks it all
                                   world=int(os.environ.get("WORLD_SIZE", "1")))
    stage = manifest.stage(stage_index)
    final_export = RunDir(run_dir).final_export(stage_index)
    if complete:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"stage {stage_index} is already complete ({final_export}); nothing to do", flush=True)
        return 0
    prev_export = starting_export(run_dir, manifest, stage_index)  # stage i-1's export, or [sft] init_from's

    device, backend = device_and_backend()
    set_determinism(manifest.spec.train.deterministic, device)  # before any CUDA kernel
    set_matmul_precision(manifest.spec.train.precision, device)
    init_distributed(device, backend, manifest.spec.launch.collective_timeout)
    rank, world = dist.get_rank(), dist.get_world_size()
    if device.type == "cpu" and world > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))  # oversubscription is ~50x slower
    st = Stage(run_dir, manifest.spec, manifest.plan, stage, rank, world, device)
    try:
        train_stage(st, prev_export, allow)
    finally:
        dist.destroy_process_group()
    return 0


def train_stage(st: Stage, prev_export: Path | None, allow: set[str]) -> None:
    spec, tr = st.spec, st.spec.train
    sampler, evals = _load_data(st, allow)

    new_layers: list[int] = []
    if prev_export is None:  # built on `meta`: no rank ever holds the whole model
        model = meta_fresh_model(spec, st.stage.total_layers)

        def fill(m):
            init_fresh(m, spec.experiment.seed, st.device)
    else:
        model, st.adapters, new_layers, fill = meta_grown_model(spec, prev_export, st.stage)
    _prepare(model, st)
    fill(model)
    optimizer = _optimizer(model, spec, st.device)

    start = 0
    found = ckpt.newest_complete(st.dir)
    if found is not None:
        start, path = found
        ckpt.load(path, model, optimizer)
        _log(st, f"resumed stage {st.index} from {path} at step {start}")
    elif prev_export is not None and spec.step.carry_optimizer_state:
        _carry_optimizer_state(st, model, optimizer, new_layers)
    if start == 0 and os.environ.get("STEPC_DUMP_OPTIMIZER_AT_START"):
        carry.dump_state(model, optimizer, Path(os.environ["STEPC_DUMP_OPTIMIZER_AT_START"]), st.rank)

    steps, offset = st.stage.steps, st.stage.lr_offset  # offset > 0: ReLoRA's LoRA phase continues one schedule
    reset_every = spec.step.relora_reset_every if st.adapters else None
    tracking = open_tracking(st.run_dir, st.index, start) if st.rank == 0 else None
    metrics = MetricsWriter(RunDir(st.run_dir).metrics, enabled=st.rank == 0, sink=tracking)
    predicted = _predicted_state_bytes(st, model)
    tokens_per_step = tr.global_batch_tokens
    peak_flops = device_peak_flops(st.device)
    per_token = model_flops_per_token(spec.model, st.stage.new_layers, st.stage.frozen_layers, spec.step.lora_rank)
    if start == 0:
        metrics.write(event="stage_start", stage=st.index, step=0, layers=st.stage.total_layers, world=st.world,
                      predicted_model_state_bytes=predicted, plan_peak_bytes=st.stage.peak_bytes)
    reset_peak_memory(st.device)  # the peak of training, not of the model build
    batches = device_batches(lambda step, micro: sampler.batch(st.stage.data_step_offset + step, micro, st.rank, st.world,
                                                                  tr.micro_batch_size, st.grad_accum),
                             range(start, steps), st.grad_accum, st.device)
    window = _Window(start)  # losses (on the device) and train-only time since the last read-back
    stop_request = RunDir(st.run_dir).stop_request(st.index) if st.rank == 0 else None
    console = Console(st.index, st.plan.stages, start, tokens_per_step, enabled=st.rank == 0)
    syncs = SyncCheck(st.device)  # STEPC_SYNC_DEBUG (bench/gpu.py): host syncs inside a step
    for step in range(start, steps):
        lr = lr_at(offset + step, tr.lr, tr.warmup_steps, st.stage.nominal_steps, tr.min_lr_ratio,
                   reset_every, spec.step.restart_warmup_steps, offset)
        for group in optimizer.param_groups:
            group["lr"] = lr
        try:
            if step + 1 == _fault_step("STEPC_FAULT_OOM_AT_STEP"):
                raise torch.OutOfMemoryError("CUDA out of memory (STEPC_FAULT_OOM_AT_STEP)")
            with syncs.step():
                loss = _train_step(st, model, optimizer, batches)
        except torch.OutOfMemoryError:
            found = ckpt.newest_complete(st.dir, warn=False)
            kept = f"The last complete checkpoint {found[1]} is kept." if found else "No checkpoint of this stage exists yet."
            raise oom_failure(spec, st.plan, st.stage, st.device, step + 1, kept) from None
        done = step + 1
        if done == _fault_step("STEPC_FAULT_NONFINITE_AT_STEP"):
            loss = torch.full_like(loss, float("nan"))
        window.losses.append(loss)
        if reset_every and is_merge_step(offset + done, reset_every, offset):
            _merge_adapters(st, optimizer, done)
            metrics.write(event="merge", stage=st.index, step=done)
        evaluate = done % spec.eval.every_steps == 0 and done != steps
        save = done % tr.checkpoint_every == 0 and done != steps
        if done % 10 == 0 or done == steps or evaluate or save:
            last = _check_losses(st, window, metrics, done)  # the one host sync: nothing is written past a NaN
            if done % 10 == 0 or done == steps:
                tps = tokens_per_step * (done - window.step) / max(window.seconds(), 1e-9)
                measured = model_state_bytes(model, optimizer, st.device)
                memory = peak_memory(st.device)
                utilisation = mfu(tps, per_token, peak_flops, st.world)
                checked = {"host_syncs": syncs.take()} if syncs.active else {}
                metrics.write(event="train", stage=st.index, step=done, loss=last, lr=lr, tokens_per_s=round(tps, 1),
                              mfu=None if utilisation is None else round(utilisation, 4),
                              model_state_bytes=measured, predicted_model_state_bytes=predicted, **memory, **checked)
                console.update(done, last, lr, tps, utilisation, memory["peak_memory_bytes"])
                window.restart(done)
        if evaluate:
            with window.paused(st.device):
                _evaluate(st, model, evals, metrics, done)
        if save:
            with window.paused(st.device):
                _save_checkpoint(st, done, model, optimizer)
            metrics.write(event="checkpoint", stage=st.index, step=done)
        hold_after_step(st.index, done, start, lambda: preempt.requested() is not None
                        or (stop_request is not None and stop_request.exists()))  # tests only (faults.py)
        if done != steps and preempt.agreed_stop(done, stop_request):  # SIGTERM/SIGINT/SIGUSR1 on any rank
            console.close()
            _stop(st, done, model, optimizer, metrics)
            return
    console.close()
    if syncs.sites:
        _log(st, "host syncs inside training steps (STEPC_SYNC_DEBUG): "
             + ", ".join(f"{site} x{n}" for site, n in syncs.sites.most_common(5)))
    if spec.step.carry_optimizer_state and st.index < len(st.plan.stages):
        found = ckpt.newest_complete(st.dir, warn=False)
        if found is None or found[0] != steps:  # the next stage carries its optimizer state from here
            _save_checkpoint(st, steps, model, optimizer)
            metrics.write(event="checkpoint", stage=st.index, step=steps)
    _evaluate(st, model, evals, metrics, steps)
    _finish(st, model, metrics, steps)
    if tracking is not None:
        tracking.close()


def _carry_optimizer_state(st: Stage, model, optimizer, new_layers: list[int]) -> None:
    """Start from stage i-1's final AdamW state for the parameters that survive the growth (carry.py)."""
    prev_dir = RunDir(st.run_dir).stage_dir(st.index - 1)
    prev_steps = st.plan.stages[st.index - 2].steps
    found = ckpt.newest_complete(prev_dir)
    if found is None or found[0] != prev_steps:  # the stage script's preflight looked for its marker; this verifies it
        raise carry_source_missing(RunDir(st.run_dir), st.index, ckpt.step_dir(prev_dir, prev_steps))
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    names = carry.carry_names(trainable, new_layers, st.stage.total_layers)
    carried = carry.load_carried(found[1], model, optimizer, names)
    MetricsWriter(RunDir(st.run_dir).metrics, enabled=st.rank == 0).write(
        event="optimizer_carry", stage=st.index, step=0, source=str(found[1].relative_to(st.run_dir)), carried=carried)
    _log(st, f"carried the AdamW state of {len(carried)} parameter tensors from {found[1]}")


class _Window:
    """The steps since the last read-back: their device-side losses and their time, less the time
    spent in evaluations and checkpoints (throughput counts training only)."""

    def __init__(self, step: int) -> None:
        self.restart(step)

    def restart(self, step: int) -> None:
        self.step, self.losses, self.start, self.excluded = step, [], time.perf_counter(), 0.0

    def seconds(self) -> float:
        return time.perf_counter() - self.start - self.excluded

    @contextmanager
    def paused(self, device: torch.device):
        _synchronize(device)  # queued training kernels belong to the window, not to the pause
        began = time.perf_counter()
        try:
            yield
        finally:
            _synchronize(device)
            self.excluded += time.perf_counter() - began


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _check_losses(st: Stage, window: _Window, metrics: MetricsWriter, done: int) -> float:
    """Read the window's losses back (a host sync); stop at the first non-finite one."""
    values = torch.stack(window.losses).tolist()
    for i, value in enumerate(values):
        if not math.isfinite(value):
            bad = done - len(values) + i + 1
            metrics.write(event="nonfinite_loss", stage=st.index, step=bad, loss=str(value))
            raise RuntimeFailure(f"non-finite loss {value} at stage {st.index} step {bad}; the last good checkpoint is kept "
                                 f"under {st.dir} (lower train.lr or check the data, then rerun the stage script to resume)")
    return values[-1]


def _fault_step(name: str) -> int | None:
    value = os.environ.get(name, "").strip()
    return int(value) if value else None


def _stop(st: Stage, done: int, model, optimizer, metrics: MetricsWriter) -> None:
    """Every rank: checkpoint the step just finished (unless the periodic one did) and leave STOPPED."""
    if done % st.spec.train.checkpoint_every != 0:
        _save_checkpoint(st, done, model, optimizer)
    if st.rank == 0:
        record = preempt.record_stop(RunDir(st.run_dir).stop_record(st.index), done, ckpt.step_dir(st.dir, done))
        metrics.write(event="stopped", stage=st.index, step=done, signal=record["signal"])
        _log(st, f"stage {st.index} stopped by {record['signal']} after step {done}; checkpoint {ckpt.step_dir(st.dir, done)}")
    dist.barrier()


def _save_checkpoint(st: Stage, done: int, model, optimizer) -> None:
    """ckpt.save, with a failed write (disk full, permissions) turned into a RuntimeFailure that names it."""
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException, not an Exception

    try:
        ckpt.save(st.dir, done, model, optimizer, {"step": done}, st.spec.train.keep_checkpoints)
    except (OSError, CheckpointException) as exc:
        cause = exc
        if isinstance(exc, CheckpointException):  # DCP wraps each rank's error: report the first OSError
            cause = next((e for e, _ in exc.failures.values() if isinstance(e, OSError)), exc)
            if not isinstance(cause, OSError):
                raise
        found = ckpt.newest_complete(st.dir, warn=False)
        kept = f"the last complete checkpoint {found[1]} is kept" if found else "no complete checkpoint exists yet"
        raise RuntimeFailure(f"cannot write checkpoint {ckpt.step_dir(st.dir, done)} (stage {st.index} step {done}): "
                             f"{cause}; {kept}. Free disk space (or fix permissions), then rerun the stage script "
                             "to resume") from None


def _train_step(st: Stage, model, optimizer, batches) -> torch.Tensor:
    """One optimizer step; returns the mean loss over ranks and micro-batches as a device scalar
    (no host sync: reading it back is the caller's choice)."""
    tr = st.spec.train
    total = torch.zeros((), dtype=torch.float32, device=st.device)
    for micro in range(st.grad_accum):
        input_ids, labels = next(batches)  # already on the device (stages read on where the previous one stopped)
        if st.sharded:
            model.set_requires_gradient_sync(micro == st.grad_accum - 1)  # reduce-scatter once per step
        with autocast_unsharded(tr.precision, st.device, st.sharded):  # GaLore on a GPU: bf16 like FSDP2's policy
            loss = model(input_ids=input_ids, labels=labels).loss
        (loss.float() / st.grad_accum).backward()
        total += loss.detach().float()
    if tr.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], tr.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=False)  # keep gradient buffers: they are part of the measured model states
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total / (st.grad_accum * st.world)


def _merge_adapters(st: Stage, optimizer, step: int) -> None:
    """ReLoRA restart: fold adapters into the frozen weights, re-init them, reset their optimizer state."""
    s = st.spec.step
    generator = torch.Generator().manual_seed(st.spec.experiment.seed * 7919 + st.index * 104729 + step)
    merge_and_reinit(st.adapters, generator)
    params = [p for a in st.adapters for p in (a.lora_A, a.lora_B)]
    reset_optimizer_state(optimizer, params, s.optimizer_reset, s.prune_ratio)


def _prepare(model, st: Stage) -> None:
    """Activation checkpointing and compilation of each layer's forward (model.wrap_decoder_layers),
    then FSDP2 (one unit per decoder layer plus the root) on the meta model, then each rank allocates
    only its shards on the device (filled by the caller)."""
    wrap_decoder_layers(model, st.spec.train.compile, st.spec.train.activation_checkpointing)  # before sharding
    if st.sharded:
        mp = None
        if st.spec.train.precision == "bf16" and st.device.type == "cuda":
            mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        kwargs: dict[str, Any] = {"mp_policy": mp} if mp else {}
        if st.replicas > 1:  # HSDP: replicate over the nodes (dim 0), shard within a node (dim 1)
            kwargs["mesh"] = init_device_mesh(st.device.type, (st.replicas, st.world // st.replicas),
                                              mesh_dim_names=("replicate", "shard"))
        for layer in model.model.layers:
            fully_shard(layer, **kwargs)
        fully_shard(model, **kwargs)
    model.to_empty(device=st.device)
    if not st.sharded and st.spec.model.tie_embeddings:
        # to_empty gives every module its own tensor, so the head would train apart from the embedding
        # (and the export, which saves the embedding once, would lose the head); FSDP2 keeps the tie
        model.tie_weights()
    model.train()


def _optimizer(model, spec: Spec, device: torch.device) -> torch.optim.Optimizer:
    """AdamW; decay on matrices (incl. adapters and embeddings), none on norms.

    method = "galore": GaLoreAdamW, projecting the gradients of the decoder layers' 2-D weights.
    """
    tr, sp = spec.train, spec.step
    galore = spec.method.optimizer == "galore"
    decay, no_decay, projected = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if galore and p.ndim == 2 and ".layers." in name:
            projected.append(p)
        else:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": tr.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if galore:
        from galore_torch import GaLoreAdamW  # optional extra: pip install 'stepc[galore]'

        groups.append({"params": projected, "weight_decay": tr.weight_decay, "rank": sp.galore_rank,
                       "update_proj_gap": sp.galore_update_gap, "scale": sp.galore_scale, "proj_type": "std"})
        return GaLoreAdamW(groups, lr=tr.lr, betas=tuple(tr.betas), no_deprecation_warning=True)
    # CUDA: fused (one kernel for all tensors, works on FSDP2's DTensors). CPU: foreach (one dispatch
    # per op for all tensors; per-parameter DTensor dispatch doubled the step time).
    kind = {"fused": True} if device.type == "cuda" else {"foreach": True}
    return torch.optim.AdamW(groups, lr=tr.lr, betas=tuple(tr.betas), **kind)


def _predicted_state_bytes(st: Stage, model) -> int | None:
    """The compiler's exact prediction summed over the ranks: one copy of the model states per replica
    (HSDP), plus the AdamW step scalars every rank holds for its shards (exact counts one set)."""
    if st.stage.exact_model_state_bytes is None:  # GaLore: no tensor-level prediction
        return None
    tensors = sum(1 for p in model.parameters() if p.requires_grad)
    return st.stage.exact_model_state_bytes * st.replicas + 4 * tensors * (st.world - st.replicas)


def _load_data(st: Stage, allow: set[str]) -> tuple[BlockSampler | BlendSampler | InstructionSampler, dict[str, Any]]:
    """Memory-map the shards `stepc data prepare` wrote before torchrun (no rank tokenises or waits),
    check the data fingerprint; the training sampler and the eval sets (held-out split, named sets).
    Method "sft": the prepared instruction examples, (input_ids, labels) rows, no eval sets."""
    if st.spec.method.objective == "instructions":
        examples = open_examples(st.run_dir, st.spec, st.plan)
        st.tokenizer = examples.tokenizer  # init_from's, saved again beside this run's export
        check_data_fingerprint(st.run_dir, examples.fingerprint, st.rank, allow)
        return InstructionSampler(examples, st.spec.experiment.seed, st.spec.model.seq_len), {}
    prepared = open_prepared(st.run_dir, st.spec.data, st.spec.model.seq_len)
    tok = prepared.tokenizer
    if tok.get_vocab_size() > st.spec.model.vocab_size:
        raise RuntimeFailure(f"the tokenizer has {tok.get_vocab_size()} tokens but model.vocab_size is {st.spec.model.vocab_size}")
    st.tokenizer = tok
    check_data_fingerprint(st.run_dir, prepared.fingerprint, st.rank, allow)
    return training_sets(prepared, st.spec.data.holdout_fraction, st.spec.experiment.seed,
                         st.spec.data.weights_at(st.stage.index))


@torch.no_grad()
def _evaluate(st: Stage, model, evals: dict[str, Any], metrics: MetricsWriter, step: int) -> dict[str, float]:
    model.eval()
    result = {}
    for name, (blocks, indices) in evals.items():
        total, count = _eval_sums(st, model, blocks, indices).tolist()
        if count > 0:
            result[name] = math.exp(total / count)
    model.train()
    if result:
        metrics.write(event="eval", stage=st.index, step=step, **{f"ppl_{k}": round(v, 4) for k, v in result.items()})
        _log(st, f"eval stage {st.index} step {step}: " + ", ".join(f"{k} ppl {v:.2f}" for k, v in result.items()))
    return result


def _eval_sums(st: Stage, model, blocks, indices) -> torch.Tensor:
    """Collective: [sum of token losses, tokens] of one eval set over all ranks, on st.device (NCCL
    reduces only GPU tensors)."""
    batches = iter_eval_batches(blocks, st.spec.train.micro_batch_size, st.rank, st.world,
                                st.spec.eval.max_tokens, indices)
    with autocast_unsharded(st.spec.train.precision, st.device, st.sharded):
        sums = loss_sums(model, batches, st.device)
    dist.all_reduce(sums)
    return sums


def _finish(st: Stage, model, metrics: MetricsWriter, steps: int) -> None:
    """Merge adapters into an HF export (the next stage's starting point; the last stage's is the result)."""
    state = ckpt.full_model_state(model)
    final = RunDir(st.run_dir).final_export(st.index)
    if st.rank == 0:
        write_export(state, st.spec, st.stage.total_layers, final, st.tokenizer)
        if st.index == len(st.plan.stages):
            export = RunDir(st.run_dir).export
            write_export(state, st.spec, st.stage.total_layers, export, st.tokenizer)
            _log(st, f"exported the trained model to {export} (Hugging Face format, safetensors)")
        metrics.write(event="stage_end", stage=st.index, step=steps)
    dist.barrier()


def _log(st: Stage, message: str) -> None:
    if st.rank == 0:
        echo(message)
