"""metrics.jsonl (one JSON object per line, appended by rank 0) and the measurements that go in it."""

from __future__ import annotations

import json
import resource
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor


class MetricsWriter:
    """Appends records to metrics.jsonl and hands each to `sink` (the experiment trackers), rank 0 only."""

    def __init__(self, path: Path, enabled: bool, sink: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.path, self.enabled, self.sink = path, enabled, sink

    def write(self, **record: Any) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record, sort_keys=True) + "\n")
        if self.sink is not None:
            self.sink(record)


def _local_bytes(t: torch.Tensor) -> int:
    local = t.to_local() if isinstance(t, DTensor) else t
    return local.numel() * local.element_size()


def model_state_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Collective: parameters + gradients + optimizer state, measured from the tensors on every rank."""
    total = 0
    for p in model.parameters():
        total += _local_bytes(p)
        if p.grad is not None:
            total += _local_bytes(p.grad)
    for state in optimizer.state.values():
        total += sum(_local_bytes(v) for v in state.values() if isinstance(v, torch.Tensor))
    out = torch.tensor([total], dtype=torch.float64)
    dist.all_reduce(out)
    return int(out.item())


def peak_memory_bytes(device: torch.device) -> int:
    """Peak allocated device memory on GPU; the process's peak resident set on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# Dense bf16 tensor-core peaks (FLOP/s) from the vendors' datasheets, by a substring of the device name.
GPU_PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10": 125e12}


def gpu_peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in GPU_PEAK_BF16.items() if key in name), None)


def mfu(tokens_per_s: float, flops_per_token: float, peak: float | None, world: int) -> float | None:
    """Model FLOPs utilisation by the plan's FLOPs accounting; None where the GPU's peak is unknown."""
    return None if not peak else tokens_per_s * flops_per_token / (peak * world)


@torch.no_grad()
def loss_sums(model: torch.nn.Module, batches, device: torch.device) -> torch.Tensor:
    """[sum of token losses, predicted tokens] over `batches` (numpy token blocks); perplexity is
    exp(sum / tokens) once summed over ranks. Shared by the runtime's evaluations and `stepc eval`."""
    sums = torch.zeros(2, dtype=torch.float64)
    for batch in batches:
        x = torch.from_numpy(batch).to(device)
        n = x.shape[0] * (x.shape[1] - 1)  # predicted tokens
        sums += torch.tensor([model(input_ids=x, labels=x).loss.item() * n, n], dtype=torch.float64)
    return sums
