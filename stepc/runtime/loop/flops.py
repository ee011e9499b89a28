"""The GPUs' peak FLOP/s, and MFU = tokens/s x model FLOPs per token / (peak FLOP/s x GPUs).

The FLOPs a step runs are counted by stepc.schema.shapes.model_flops_per_token (shared with the
compiler). Peaks are dense (no sparsity) BF16 tensor-core FLOP/s from NVIDIA's datasheets, keyed by
the exact name torch.cuda.get_device_name reports; a name not in the table gets no MFU rather than a
guess (an "H100 PCIe" is not an SXM H100, an "L40" is not an "L4").
"""

from __future__ import annotations

import torch


GPU_PEAK_BF16: dict[str, float] = {
    "NVIDIA H100 80GB HBM3": 989.4e12,  # H100 SXM5
    "NVIDIA H100 PCIe": 756.0e12,
    "NVIDIA H100 NVL": 835.5e12,
    "NVIDIA H200": 989.4e12,  # H200 SXM
    "NVIDIA H200 NVL": 835.5e12,
    "NVIDIA GH200 480GB": 989.4e12,
    "NVIDIA A100-SXM4-80GB": 312e12,
    "NVIDIA A100-SXM4-40GB": 312e12,
    "NVIDIA A100 80GB PCIe": 312e12,
    "NVIDIA A100-PCIE-40GB": 312e12,
    "NVIDIA L40S": 362.05e12,
    "NVIDIA L40": 181.05e12,
    "NVIDIA L4": 121.0e12,
    "NVIDIA A10": 125.0e12,
}


def peak_flops(device_name: str | None) -> float | None:
    """Dense BF16 peak of the exactly named GPU, None when unknown (or not a GPU)."""
    return GPU_PEAK_BF16.get(device_name) if device_name else None


def device_peak_flops(device: torch.device) -> float | None:
    return peak_flops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None


def mfu(tokens_per_s: float, per_token: float, peak: float | None, world: int) -> float | None:
    return None if not peak else tokens_per_s * per_token / (peak * world)
