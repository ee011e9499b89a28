"""Train one stage of a compiled run: the loop, top to bottom.

    load + verify manifest -> data -> model (fresh, or grown from stage i-1's export)
    -> fully_shard per layer + root -> AdamW -> resume from the newest complete checkpoint
    -> steps (grad accumulation, clipping, adapter merges, eval, checkpoints) -> export

Launched by stage-<i>.sh through torchrun; every rank runs this file.

Fault injection (tests only): STEPC_FAULT_NONFINITE_AT_STEP=N treats the loss of (1-based) step N
as NaN, exercising the non-finite-loss stop without waiting for a real divergence.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from stepc.rundir import RunDir
from stepc.runtime import checkpoint as ckpt
from stepc.runtime import preempt
from stepc.runtime.console import Console, echo
from stepc.runtime.data import BlockSampler, PackedDataset, eval_sets, iter_eval_batches, open_datasets
from stepc.runtime.export import write_export
from stepc.runtime.guard import RuntimeFailure, check_data_fingerprint, preflight, previous_stage_export
from stepc.runtime.lora import LoRALinear, merge_and_reinit, reset_optimizer_state
from stepc.runtime.lr import is_merge_step, lr_at
from stepc.runtime.metrics import MetricsWriter, gpu_peak_flops, loss_sums, mfu, model_state_bytes, peak_memory_bytes
from stepc.runtime.model import fresh_model, grown_model
from stepc.runtime.tracking import open_tracking
from stepc.schema.plan import Plan, StagePlan
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
        if self.spec.experiment.method == "galore":
            return False
        return self.world > 1 or self.device.type == "cuda"

    @property
    def grad_accum(self) -> int:
        tr, seq = self.spec.train, self.spec.model.seq_len
        return tr.global_batch_tokens // (seq * tr.micro_batch_size * self.world)


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
    prev_export = previous_stage_export(run_dir, stage_index)

    device, backend = _device_and_backend()
    dist.init_process_group(backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    if device.type == "cpu" and world > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))  # oversubscription is ~50x slower
    torch.use_deterministic_algorithms(True, warn_only=True)
    st = Stage(run_dir, manifest.spec, manifest.plan, stage, rank, world, device)
    try:
        train_stage(st, prev_export, allow)
    finally:
        dist.destroy_process_group()
    return 0


def _device_and_backend() -> tuple[torch.device, str]:
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return torch.device("cuda", local), "nccl"
    return torch.device("cpu"), "gloo"


def train_stage(st: Stage, prev_export: Path | None, allow: set[str]) -> None:
    spec, tr = st.spec, st.spec.train
    train_data, evals = _load_data(st, allow)
    sampler = BlockSampler(train_data.blocks, spec.experiment.seed, indices=evals.pop("_train_idx"))

    if prev_export is None:
        model = fresh_model(spec, st.stage.total_layers, spec.experiment.seed)
    else:
        model, st.adapters, _ = grown_model(spec, prev_export, st.stage)
    _prepare(model, st)
    optimizer = _optimizer(model, spec)

    start = 0
    found = ckpt.newest_complete(st.dir)
    if found is not None:
        start, path = found
        ckpt.load(path, model, optimizer)
        _log(st, f"resumed stage {st.index} from {path} at step {start}")

    steps, offset = st.stage.steps, st.stage.lr_offset  # offset > 0: ReLoRA's LoRA phase continues one schedule
    reset_every = spec.step.relora_reset_every if st.adapters else None
    tracking = open_tracking(st.run_dir, st.index, start) if st.rank == 0 else None
    metrics = MetricsWriter(RunDir(st.run_dir).metrics, enabled=st.rank == 0, sink=tracking)
    predicted = _predicted_state_bytes(st, model)
    tokens_per_step = tr.global_batch_tokens
    peak_flops = gpu_peak_flops(st.device)
    if start == 0:
        metrics.write(event="stage_start", stage=st.index, step=0, layers=st.stage.total_layers, world=st.world,
                      predicted_model_state_bytes=predicted, plan_peak_bytes=st.stage.peak_bytes)
    last_time, last_step = time.perf_counter(), start
    stop_request = RunDir(st.run_dir).stop_request(st.index) if st.rank == 0 else None
    console = Console(st.index, st.plan.stages, start, tokens_per_step, enabled=st.rank == 0)
    for step in range(start, steps):
        lr = lr_at(offset + step, tr.lr, tr.warmup_steps, st.stage.nominal_steps, tr.min_lr_ratio,
                   reset_every, spec.step.restart_warmup_steps, offset)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss = _train_step(st, model, optimizer, sampler, step)
        done = step + 1
        if done == _fault_step("STEPC_FAULT_NONFINITE_AT_STEP"):
            loss = float("nan")
        if not math.isfinite(loss):
            metrics.write(event="nonfinite_loss", stage=st.index, step=done, loss=str(loss))
            raise RuntimeFailure(f"non-finite loss {loss} at stage {st.index} step {done}; the last good checkpoint is kept "
                                 f"under {st.dir} (lower train.lr or check the data, then rerun the stage script to resume)")
        if reset_every and is_merge_step(offset + done, reset_every, offset):
            _merge_adapters(st, optimizer, done)
            metrics.write(event="merge", stage=st.index, step=done)
        if done % 10 == 0 or done == steps:
            now = time.perf_counter()
            tps = tokens_per_step * (done - last_step) / max(now - last_time, 1e-9)
            last_time, last_step = now, done
            measured = model_state_bytes(model, optimizer)
            utilisation = mfu(tps, st.stage.flops / max(1, st.stage.tokens), peak_flops, st.world)
            peak_memory = peak_memory_bytes(st.device)
            metrics.write(event="train", stage=st.index, step=done, loss=loss, lr=lr, tokens_per_s=round(tps, 1),
                          mfu=None if utilisation is None else round(utilisation, 4),
                          model_state_bytes=measured, predicted_model_state_bytes=predicted,
                          peak_memory_bytes=peak_memory)
            console.update(done, loss, lr, tps, utilisation, peak_memory)
        if done % spec.eval.every_steps == 0 and done != steps:
            _evaluate(st, model, evals, metrics, done)
        if done % tr.checkpoint_every == 0 and done != steps:
            _save_checkpoint(st, done, model, optimizer)
            metrics.write(event="checkpoint", stage=st.index, step=done)
        if done != steps and preempt.agreed_stop(done, st.device, stop_request):  # SIGTERM/SIGINT/SIGUSR1 on any rank
            console.close()
            _stop(st, done, model, optimizer, metrics)
            return
    console.close()
    _evaluate(st, model, evals, metrics, steps)
    _finish(st, model, metrics, steps)
    if tracking is not None:
        tracking.close()


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


def _train_step(st: Stage, model, optimizer, sampler: BlockSampler, step: int) -> float:
    tr = st.spec.train
    total = torch.zeros((), dtype=torch.float64)
    for micro in range(st.grad_accum):
        data_step = st.stage.data_step_offset + step  # stages read on where the previous one stopped
        batch = torch.from_numpy(sampler.batch(data_step, micro, st.rank, st.world, tr.micro_batch_size, st.grad_accum)).to(st.device)
        if st.sharded:
            model.set_requires_gradient_sync(micro == st.grad_accum - 1)  # reduce-scatter once per step
        out = model(input_ids=batch, labels=batch)
        (out.loss.float() / st.grad_accum).backward()
        total += out.loss.detach().double().cpu()
    if tr.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], tr.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=False)  # keep gradient buffers: they are part of the measured model states
    total /= st.grad_accum
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return float(total) / st.world


def _merge_adapters(st: Stage, optimizer, step: int) -> None:
    """ReLoRA restart: fold adapters into the frozen weights, re-init them, reset their optimizer state."""
    s = st.spec.step
    generator = torch.Generator().manual_seed(st.spec.experiment.seed * 7919 + st.index * 104729 + step)
    merge_and_reinit(st.adapters, generator)
    params = [p for a in st.adapters for p in (a.lora_A, a.lora_B)]
    reset_optimizer_state(optimizer, params, s.optimizer_reset, s.prune_ratio)


def _prepare(model, st: Stage) -> None:
    """Device, activation checkpointing, and FSDP2: one unit per decoder layer plus the root."""
    model.to(st.device)
    if st.spec.train.activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if st.sharded:
        mp = None
        if st.spec.train.precision == "bf16" and st.device.type == "cuda":
            mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        kwargs = {"mp_policy": mp} if mp else {}
        for layer in model.model.layers:
            fully_shard(layer, **kwargs)
        fully_shard(model, **kwargs)
    model.train()


def _optimizer(model, spec: dict[str, Any]) -> torch.optim.Optimizer:
    """AdamW; decay on matrices (incl. adapters and embeddings), none on norms.

    method = "galore": GaLoreAdamW, projecting the gradients of the decoder layers' 2-D weights.
    """
    tr, sp = spec.train, spec.step
    galore = spec.experiment.method == "galore"
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
    # foreach: one dispatch per op for all tensors; per-parameter DTensor dispatch doubled the step time.
    return torch.optim.AdamW(groups, lr=tr.lr, betas=tuple(tr.betas), foreach=True)


def _predicted_state_bytes(st: Stage, model) -> int | None:
    """The compiler's exact prediction, plus AdamW step scalars that every rank holds for its shards."""
    if st.stage.exact_model_state_bytes is None:  # GaLore: no tensor-level prediction
        return None
    tensors = sum(1 for p in model.parameters() if p.requires_grad)
    return st.stage.exact_model_state_bytes + 4 * tensors * (st.world - 1)


def _load_data(st: Stage, allow: set[str]) -> tuple[PackedDataset, dict[str, Any]]:
    """Tokenizer and packed blocks (rank 0 builds caches first), held-out split and named validation sets."""
    data, seq = st.spec.data, st.spec.model.seq_len
    cache = RunDir(st.run_dir).cache

    def build():
        return open_datasets(data, seq, cache)

    if st.rank == 0:
        tok, train, named = build()
    dist.barrier()
    if st.rank != 0:
        tok, train, named = build()
    if tok.get_vocab_size() > st.spec.model.vocab_size:
        raise RuntimeFailure(f"the tokenizer has {tok.get_vocab_size()} tokens but model.vocab_size is {st.spec['model']['vocab_size']}")
    st.tokenizer = tok
    fingerprint = {"train": train.fingerprint, **{name: ds.fingerprint for name, ds in named.items()}}
    check_data_fingerprint(st.run_dir, fingerprint, st.rank, allow)
    train_idx, evals = eval_sets(train, named, data.holdout_fraction, st.spec.experiment.seed)
    return train, {"_train_idx": train_idx, **evals}


@torch.no_grad()
def _evaluate(st: Stage, model, evals: dict[str, Any], metrics: MetricsWriter, step: int) -> dict[str, float]:
    model.eval()
    result = {}
    for name, (blocks, indices) in evals.items():
        batches = iter_eval_batches(blocks, st.spec.train.micro_batch_size, st.rank, st.world,
                                    st.spec.eval.max_tokens, indices)
        sums = loss_sums(model, batches, st.device)
        dist.all_reduce(sums)
        if sums[1] > 0:
            result[name] = math.exp(sums[0].item() / sums[1].item())
    model.train()
    if result:
        metrics.write(event="eval", stage=st.index, step=step, **{f"ppl_{k}": round(v, 4) for k, v in result.items()})
        _log(st, f"eval stage {st.index} step {step}: " + ", ".join(f"{k} ppl {v:.2f}" for k, v in result.items()))
    return result


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
