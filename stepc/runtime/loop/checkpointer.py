"""A stage's checkpoints as the loop sees them: when to save (every train.checkpoint_every steps),
saving with a failed write named, resuming from the newest complete one, carrying stage i-1's
optimizer state into a fresh stage i, the final checkpoint the next stage carries from, and the
checkpoint plus STOPPED record of a stop signal. The files themselves: checkpoint.py (DCP)."""

from __future__ import annotations

import time
from pathlib import Path

from stepc.rundir import RunDir
from stepc.runtime.guard import RuntimeFailure, carry_source_missing
from stepc.runtime.loop import checkpoint as ckpt
from stepc.runtime.loop import preempt
from stepc.runtime.loop.console import echo
from stepc.runtime.loop.metrics import MetricsWriter
from stepc.runtime.loop.setup import Stage, Trainee
from stepc.runtime.model import carry


class Checkpointer:
    def __init__(self, st: Stage, metrics: MetricsWriter) -> None:
        self.st, self.metrics = st, metrics

    def should_save(self, done: int) -> bool:
        """A periodic checkpoint (the end of a stage is its export, not a checkpoint)."""
        return done % self.st.spec.train.checkpoint_every == 0 and done != self.st.stage.steps

    def resume(self, trainee: Trainee, path: Path, step: int) -> None:
        """Collective: restore the complete checkpoint `path` of this stage (ckpt.newest_complete's)."""
        began = time.perf_counter()
        ckpt.load(path, trainee.model, trainee.optimizer)
        seconds = round(time.perf_counter() - began, 3)
        MetricsWriter(RunDir(self.st.run_dir).metrics, enabled=self.st.rank == 0).write(  # a record, not a tracked event
            event="resume", stage=self.st.index, step=step, seconds=seconds)  # the DCP read (bench/scale.py)
        self._log(f"resumed stage {self.st.index} from {path} at step {step} ({seconds:.1f} s)")

    def carry_in(self, trainee: Trainee) -> None:
        """Collective: start from stage i-1's final AdamW state for the parameters that survive the
        growth (model/carry.py)."""
        st = self.st
        prev_dir = RunDir(st.run_dir).stage_dir(st.index - 1)
        prev_steps = st.plan.stages[st.index - 2].steps
        found = ckpt.newest_complete(prev_dir)
        if found is None or found[0] != prev_steps:  # the stage script's preflight looked for its marker; this verifies it
            raise carry_source_missing(RunDir(st.run_dir), st.index, ckpt.step_dir(prev_dir, prev_steps))
        trainable = [name for name, p in trainee.model.named_parameters() if p.requires_grad]
        names = carry.carry_names(trainable, trainee.new_layers, st.stage.total_layers)
        carried = carry.load_carried(found[1], trainee.model, trainee.optimizer, names)
        MetricsWriter(RunDir(st.run_dir).metrics, enabled=st.rank == 0).write(  # a record, not a tracked event
            event="optimizer_carry", stage=st.index, step=0, source=str(found[1].relative_to(st.run_dir)), carried=carried)
        self._log(f"carried the AdamW state of {len(carried)} parameter tensors from {found[1]}")

    def save(self, done: int, trainee: Trainee, event: bool = True) -> None:
        """Collective: a checkpoint of step `done` (and its "checkpoint" record), with a failed write
        (disk full, permissions) turned into a RuntimeFailure that names it."""
        from torch.distributed.checkpoint.api import CheckpointException  # a BaseException, not an Exception

        st = self.st
        began = time.perf_counter()
        try:
            ckpt.save(st.dir, done, trainee.model, trainee.optimizer, {"step": done}, st.spec.train.keep_checkpoints)
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
        if event:
            self.metrics.write(event="checkpoint", stage=st.index, step=done,
                               seconds=round(time.perf_counter() - began, 3))  # for the ETA (eta.py)

    def save_for_next_stage(self, trainee: Trainee) -> None:
        """step.carry_optimizer_state: the next stage carries its optimizer state from this stage's last step."""
        st = self.st
        if not st.spec.step.carry_optimizer_state or st.last:
            return
        found = ckpt.newest_complete(st.dir, warn=False)
        if found is None or found[0] != st.stage.steps:
            self.save(st.stage.steps, trainee)

    def stop(self, done: int, trainee: Trainee) -> None:
        """Every rank, on an agreed stop: checkpoint the step just finished (unless the periodic one
        did) and leave the STOPPED record the stage script reports."""
        import torch.distributed as dist

        st = self.st
        if not self.should_save(done):
            self.save(done, trainee, event=False)  # the STOPPED record names it
        if st.rank == 0:
            record = preempt.record_stop(RunDir(st.run_dir).stop_record(st.index), done, ckpt.step_dir(st.dir, done))
            self.metrics.write(event="stopped", stage=st.index, step=done, signal=record["signal"])
            self._log(f"stage {st.index} stopped by {record['signal']} after step {done}; checkpoint "
                      f"{ckpt.step_dir(st.dir, done)}")
        dist.barrier()

    def _log(self, message: str) -> None:
        if self.st.rank == 0:
            echo(message)
