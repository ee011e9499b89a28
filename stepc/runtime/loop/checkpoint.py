"""Atomic, resumable checkpoints with torch.distributed.checkpoint (DCP).

Layout: checkpoints/stage-<i>/step-<000123>/ holds DCP shards plus COMPLETE, a JSON list of
every file and its size written by rank 0 after all ranks finished. A checkpoint is written
under a ".tmp" name and renamed only after COMPLETE exists, so a crash mid-write leaves a
directory that is never picked; a later truncated or missing file is detected by size and
the checkpoint is skipped with a warning that names it.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from stepc.atomic import atomic_write_text
from stepc.rundir import CHECKPOINT_MARKER, step_dir_name

MARKER = CHECKPOINT_MARKER
LOW_SPACE = 64 << 20  # a failed write with less free space than this is reported as a full disk


def step_dir(stage_dir: Path, step: int) -> Path:
    return stage_dir / step_dir_name(step)


def is_complete(path: Path) -> tuple[bool, str]:
    """(complete?, reason) — every file listed in COMPLETE exists with the recorded size."""
    marker = path / MARKER
    if not marker.is_file():
        return False, f"{marker} is missing (the write was interrupted)"
    try:
        listed = json.loads(marker.read_text())
    except (OSError, json.JSONDecodeError):
        return False, f"{marker} is unreadable"
    for name, size in listed["files"].items():
        file = path / name
        if not file.is_file():
            return False, f"{file} is missing"
        if file.stat().st_size != size:
            return False, f"{file} is truncated ({file.stat().st_size} of {size} bytes)"
    return True, ""


def newest_complete(stage_dir: Path, warn: bool = True) -> tuple[int, Path] | None:
    """The newest complete step checkpoint of a stage, skipping (and naming) broken ones."""
    if not stage_dir.is_dir():
        return None
    candidates = sorted((p for p in stage_dir.glob("step-*") if not p.name.endswith(".tmp")), reverse=True)
    for path in candidates:
        ok, reason = is_complete(path)
        if ok:
            return int(path.name.split("-")[1]), path
        if warn:
            warnings.warn(f"skipping incomplete checkpoint {path}: {reason}", stacklevel=2)
    return None


def save(stage_dir: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
         extra: dict[str, Any], keep: int) -> Path:
    """Collective: every rank calls it. Returns the final checkpoint directory.

    A failed write (e.g. a full disk) removes the partial ".tmp" directory where it can, frees
    its space, and re-raises; the previous complete checkpoints are untouched.
    """
    final = step_dir(stage_dir, step)
    tmp = final.with_name(final.name + ".tmp")
    rank = dist.get_rank()
    try:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        dist.barrier()
        model_sd, optim_sd = get_state_dict(model, optimizer)
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp))
        # Per-rank RNG and loop state: small, so plain torch.save beside the shards.
        torch.save({"rng": torch.get_rng_state(), **extra}, tmp / f"extra-rank{rank}.pt")
        _fsync_dir_files(tmp)
        dist.barrier()
        if rank == 0:
            files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir()) if p.is_file()}
            atomic_write_text(tmp / MARKER, json.dumps({"step": step, "files": files}, indent=1))
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
    except BaseException as exc:  # DCP raises CheckpointException, a BaseException
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            raise
        free = _free_bytes(stage_dir)  # measured before the partial files are removed
        shutil.rmtree(tmp, ignore_errors=True)  # never picked anyway (".tmp"), but it holds disk space
        if not isinstance(exc, OSError) and free is not None and free < LOW_SPACE:
            # A full disk does not always surface as ENOSPC: torch.save's zip writer reports "unexpected pos".
            raise OSError(errno.ENOSPC, f"No space left on device while writing {tmp} ({free} bytes free; "
                                        f"{_first_line(exc)})") from exc
        raise
    if rank == 0:
        _prune(stage_dir, keep)
    dist.barrier()
    return final


def load(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Collective: restore model and optimizer in place; returns this rank's extra state."""
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    extra_file = path / f"extra-rank{dist.get_rank()}.pt"
    if not extra_file.exists():  # resumed on more ranks than saved it: the loop state is the same on every rank
        extra_file = path / "extra-rank0.pt"
    extra = torch.load(extra_file, weights_only=False)
    torch.set_rng_state(extra.pop("rng"))
    return extra


def full_model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Collective: the unsharded model state dict on rank 0's CPU (empty on other ranks)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _prune(stage_dir: Path, keep: int) -> None:
    steps = sorted(p for p in stage_dir.glob("step-*") if not p.name.endswith(".tmp"))
    for old in steps[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def _free_bytes(path: Path) -> int | None:
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def _first_line(exc: BaseException) -> str:
    failures = getattr(exc, "failures", None)  # CheckpointException: {rank: (exception, traceback)}
    if failures:
        exc = next(iter(failures.values()))[0]
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


def _fsync_dir_files(path: Path) -> None:
    for file in path.iterdir():
        if file.is_file():
            with open(file, "rb") as handle:
                os.fsync(handle.fileno())
