"""metrics.jsonl (one JSON object per line, appended by rank 0) and the measurements that go in it."""

from __future__ import annotations

import json
import resource
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor


class MetricsWriter:
    """Appends records to metrics.jsonl and hands each to `sink` (the experiment trackers), rank 0 only.

    The file's records also carry "time" (Unix seconds when written): the ETA (eta.py) and anyone
    replaying a run read durations from it. The trackers do not get it (it is not a metric); `watch`
    (the ETA) gets the record as written to the file."""

    def __init__(self, path: Path, enabled: bool, sink: Callable[[dict[str, Any]], None] | None = None,
                 watch: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.path, self.enabled, self.sink, self.watch = path, enabled, sink, watch

    def write(self, **record: Any) -> None:
        if not self.enabled:
            return
        line = {**record, "time": round(time.time(), 3)}
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(line, sort_keys=True) + "\n")
        if self.watch is not None:
            self.watch(line)
        if self.sink is not None:
            self.sink(record)


def _local_bytes(t: torch.Tensor) -> int:
    local = t.to_local() if isinstance(t, DTensor) else t
    return local.numel() * local.element_size()


def model_state_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer, device: torch.device) -> int:
    """Collective: parameters + gradients + optimizer state, measured from the tensors on every rank
    (summed on `device`: NCCL reduces only GPU tensors)."""
    total = 0
    for p in model.parameters():
        total += _local_bytes(p)
        if p.grad is not None:
            total += _local_bytes(p.grad)
    for state in optimizer.state.values():
        total += sum(_local_bytes(v) for v in state.values() if isinstance(v, torch.Tensor))
        # GaLoreAdamW keeps each matrix's projector as an object holding its orthogonal matrix
        projector = getattr(state.get("projector"), "ortho_matrix", None)
        if isinstance(projector, torch.Tensor):
            total += _local_bytes(projector)
    out = torch.tensor([total], dtype=torch.float64, device=device)
    dist.all_reduce(out)
    return int(out.item())


def reset_peak_memory(device: torch.device) -> None:
    """Start the peak counters after setup, so the peak is the training step's, not the model build's."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> dict[str, int | None]:
    """GPU: peak allocated and reserved bytes since reset_peak_memory, the caching allocator's
    retries (each one a cudaFree of cached blocks and a retried cudaMalloc: a sign of running at
    the edge), and the device memory in use now by the driver's count (mem_get_info) beside the
    allocator's reserved bytes now: their difference is the memory outside the allocator. CPU: the
    process's peak resident set; no reserved bytes or retries."""
    if device.type == "cuda":
        stats = torch.cuda.memory_stats(device)
        free, total = torch.cuda.mem_get_info(device)
        return {"peak_memory_bytes": int(torch.cuda.max_memory_allocated(device)),
                "peak_reserved_bytes": int(torch.cuda.max_memory_reserved(device)),
                "alloc_retries": int(stats.get("num_alloc_retries", 0)),
                # the driver's view now: the allocator's reserved bytes plus what it does not see (CUDA
                # context, NCCL's and cuBLAS's buffers), what will-it-fit's headroom must cover
                "device_used_bytes": int(total - free),
                "reserved_now_bytes": int(torch.cuda.memory_reserved(device))}
    return {"peak_memory_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "peak_reserved_bytes": None, "alloc_retries": None}


@torch.no_grad()
def loss_sums(model: torch.nn.Module, batches, device: torch.device) -> torch.Tensor:
    """[sum of token losses, predicted tokens] over `batches` (numpy token blocks); perplexity is
    exp(sum / tokens) once summed over ranks. Shared by the runtime's evaluations and `stepc eval`."""
    sums = torch.zeros(2, dtype=torch.float64, device=device)  # on the device: no host sync per batch
    for batch in batches:
        x = torch.from_numpy(batch).to(device)
        n = x.shape[0] * (x.shape[1] - 1)  # predicted tokens
        sums[0] += model(input_ids=x, labels=x).loss.double() * n
        sums[1] += n
    return sums
