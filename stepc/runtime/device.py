"""The rank's device, its process group and its determinism settings, set up once per stage.

Collectives: on a GPU the default group is "cpu:gloo,cuda:nccl" - NCCL for every tensor on the GPU
(the loss sums, the eval sums, the measured byte counts, FSDP2's all-gathers all live on the model's
device) and gloo for what only exists on the host (object collectives in checkpointing). `device_id`
binds the NCCL communicator to this rank's GPU at init, so barriers never guess the device. On CPU
it is plain gloo. The timeout comes from `[launch] collective_timeout`: rank 0 gathers and
writes exports while the other ranks wait in a barrier, which the 10-minute default would kill.

Determinism (`[train] deterministic`): CUBLAS_WORKSPACE_CONFIG must be set before the first cuBLAS
handle exists, so this runs before any CUDA work; `use_deterministic_algorithms(True)` without
warn_only makes an op with no deterministic kernel an error instead of a silent warning, and the
flash / memory-efficient attention kernels (whose backward is not deterministic) are switched off
so SDPA uses its math path. Off (the default), nothing is touched: cuDNN/cuBLAS pick their fastest
kernels and no fill of uninitialised memory is paid.

Matmul precision on a GPU is set, not inherited: precision = "bf16" computes in bf16 already, and
the few fp32 matmuls left (adapter merges, fp32 adapters' products) may use TF32 ("high");
precision = "fp32" is a request for fp32 arithmetic, so TF32 stays off ("highest").
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist


def device_and_backend() -> tuple[torch.device, str]:
    """This rank's device (LOCAL_RANK's GPU, else the CPU) and the backend string for init_process_group."""
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return torch.device("cuda", local), "cpu:gloo,cuda:nccl"
    return torch.device("cpu"), "gloo"


def worker_threads(local_workers: int) -> int:
    """CPU threads (OMP_NUM_THREADS) of each of `local_workers` worker processes on this node: on a GPU
    node 1, torchrun's own default (the GPU does the work; more threads only contend); on CPU the
    node's CPUs this process may use, shared out (oversubscribing the cores is ~50x slower)."""
    import torch

    if torch.cuda.is_available():
        return 1
    return max(1, len(os.sched_getaffinity(0)) // max(1, local_workers))


def init_distributed(device: torch.device, backend: str, timeout_s: int) -> None:
    """init_process_group with the collective timeout, and device_id on GPUs (eager NCCL init)."""
    kwargs = {"device_id": device} if device.type == "cuda" else {}
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s), **kwargs)


def set_matmul_precision(precision: str, device: torch.device) -> None:
    """TF32 for fp32 matmuls under bf16 training on a GPU, none under fp32 (see the module docstring)."""
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high" if precision == "bf16" else "highest")


def set_determinism(enabled: bool, device: torch.device) -> None:
    """Call before any CUDA kernel runs (see the module docstring)."""
    if not enabled:
        return
    if device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False
        torch.backends.cuda.enable_flash_sdp(False)
        torch.backends.cuda.enable_mem_efficient_sdp(False)
        torch.backends.cuda.enable_cudnn_sdp(False)
    torch.use_deterministic_algorithms(True)
