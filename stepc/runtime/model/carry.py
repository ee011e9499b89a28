"""Optimizer-state carry across growth (``[step] carry_optimizer_state = true``).

Without it every stage starts AdamW from nothing (the paper resets the optimizer at each growth,
Appendix F). With it, the moments (``exp_avg``, ``exp_avg_sq``) and the ``step`` counter of every
parameter that *survives* a growth are carried from the last step of stage i into stage i+1:

* a parameter survives when it is trainable in both stages and growth leaves its value unchanged.
  In STEP that is the embeddings, the final norm and the head: the layers trained in stage i are
  frozen behind adapters in stage i+1 (frozen tensors have no optimizer state), and the adapters
  are merged into the export and re-initialised, so their old moments describe tensors that no
  longer exist. With method "growth" (the whole grown model trains) every old layer survives
  too: its name is remapped through the growth, since old layer j is renumbered when layers are
  inserted below it (stack-middle, interpolation).
* New layers start empty (zero moments, step 0), also when they are copies of an old layer. A
  copy sits at another depth (or, with FPI, has zeroed output projections), so its source's
  gradient statistics do not describe its own gradients; in STEP the source was usually frozen in
  stage i and has no moments to copy; and the mean of two layers (interpolation-mean) has no
  defined moments at all. Empty moments with their own step counter give the new layers AdamW's
  ordinary bias-corrected start, exactly as without carry.

The state travels through stage i's last checkpoint (torch.distributed.checkpoint, written at its
final step when carry is on) and is read by name, so it reshards freely between rank counts. Memory
does not change: a carried parameter holds moments from its first step on either way, and DCP loads
into the optimizer's own tensors (no second copy). Only the final checkpoint of each stage but the
last is extra, on disk.

No library maps optimizer state between two differently-shaped models by parameter name;
torch.distributed.checkpoint does the sharded reading, this module only picks the names.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp

__all__ = ["carry_names", "checkpointed_state_names", "dump_state", "empty_state", "load_carried", "step_device"]

LAYER = re.compile(r"^(model\.layers\.)(\d+)(\..*)$")
ADAPTER = re.compile(r"\.lora_[AB]$")
PREFIX, MOMENT = "optim.state.", ".exp_avg"


def carry_names(trainable: list[str], new_layers: list[int], num_layers: int) -> dict[str, str]:
    """{name in stage i+1: name in stage i} for every trainable parameter that may survive the growth.

    ``new_layers`` are the indices of the inserted layers in the grown model of ``num_layers``; the
    other layers are the old ones in their old order, so grown index ``g`` of old layer ``j`` maps
    back to ``j``. New layers and adapters are left out (they start empty, see the module docstring).
    """
    new = set(new_layers)
    old_of = {g: j for j, g in enumerate(i for i in range(num_layers) if i not in new)}
    out = {}
    for name in trainable:
        if ADAPTER.search(name):
            continue
        match = LAYER.match(name)
        if match is None:
            out[name] = name
        elif int(match.group(2)) not in new:
            out[name] = f"{match.group(1)}{old_of[int(match.group(2))]}{match.group(3)}"
    return out


def checkpointed_state_names(path: Path) -> set[str]:
    """Names of the parameters whose AdamW moments a DCP checkpoint holds."""
    metadata = dcp.FileSystemReader(str(path)).read_metadata()
    return {key[len(PREFIX):-len(MOMENT)] for key in metadata.state_dict_metadata
            if key.startswith(PREFIX) and key.endswith(MOMENT)}


def load_carried(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 rename: dict[str, str]) -> list[str]:
    """Collective: give the surviving parameters of a fresh AdamW the state checkpoint ``path`` holds.

    The state is created the way AdamW creates it on its first step (a float32 ``step`` scalar where
    the optimizer's kernel reads it, see :func:`step_device`; moments shaped and sharded like the
    parameter) and DCP then reads the saved values into those
    very tensors, resharding as needed. Every other parameter keeps no state, as with a fresh
    AdamW. Returns the carried names (stage i+1's), sorted.
    """
    if optimizer.state:
        raise RuntimeError("load_carried expects an optimizer that has not stepped yet")
    available = checkpointed_state_names(path)
    params = dict(model.named_parameters())
    carried = sorted(new for new, old in rename.items() if old in available and params[new].requires_grad)
    targets = {}
    for new in carried:
        p = params[new]
        optimizer.state[p] = state = empty_state(optimizer, p)
        targets[rename[new]] = state
    dcp.load({"optim": {"state": targets}}, checkpoint_id=str(path))
    return carried


def empty_state(optimizer: torch.optim.Optimizer, p: torch.Tensor) -> dict[str, torch.Tensor]:
    """The state AdamW gives `p` at its first step (zeros): the target DCP reads carried values into."""
    return {"step": torch.zeros((), dtype=torch.float32, device=step_device(optimizer, p)),
            "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
            "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format)}


def step_device(optimizer: torch.optim.Optimizer, p: torch.Tensor) -> torch.device:
    """Where AdamW keeps a parameter's ``step``: on the parameter's device for the fused and capturable
    kernels (they read it through a device pointer: a CPU step there is an illegal memory access on
    a GPU), on the CPU otherwise (the foreach and for-loop kernels read it on the host)."""
    defaults = optimizer.defaults
    return p.device if defaults.get("fused") or defaults.get("capturable") else torch.device("cpu")


def dump_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, path: Path, rank: int) -> None:
    """Collective (tests): rank 0 writes {name: {key: full tensor}} of every parameter with optimizer state."""
    from torch.distributed.tensor import DTensor

    out = {}
    for name, p in model.named_parameters():  # the same order on every rank: the gathers pair up
        if p in optimizer.state:
            out[name] = {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().cpu().clone()
                         for k, v in optimizer.state[p].items()}
    if rank == 0:
        torch.save(out, path)
