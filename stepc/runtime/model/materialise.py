"""Meta-device construction: no rank ever holds the whole model.

    build on `meta` (shapes only) -> [compile, activation checkpointing] -> fully_shard
    -> to_empty(device) (each rank allocates its shards) -> fill every shard

A shard is filled from the full value of its tensor, produced on the CPU one tensor at a time and
sliced to the rank's part (DTensor's own local-shape/offset rule) before it is copied to the device:

* fresh model: each module's tensors are initialised by transformers' own `_init_weights` on a
  full-size stand-in of that module, under a seed derived from the experiment seed and the
  module's name. The values depend only on (seed, name, device type), never on the world size or
  the sharding, so 1 rank, N ranks and the eager CPU reference (tests/eager_reference.py) are
  bit-identical. On a GPU the stand-in lives on the GPU and is drawn by its generator: the ranks
  draw in parallel at the device's speed (the CPU took 19 s per rank for 1.2B) and copy only their
  slice; the values then differ from a CPU run's (another generator), as any GPU run's do.
* grown model (stage i > 1): old layers, embeddings and norms are read from stage i-1's safetensors
  export with `safe_open(...).get_slice` (only the rank's rows are read), new layers are the copy or
  mean of their parents (growth.layer_sources, the same map the eager path follows; FPI zeros), adapters' A are drawn from the
  same seeded generator in the same order as lora.apply_adapters, B is zero. Bit-identical to the
  eager reference (tests/eager_reference.py grown_model).

torchtitan initialises the sharded model directly with DTensor random ops, which makes the values
depend on the mesh; stepc needs world-size-independent weights (1 rank == 2 ranks is a test), hence
full tensors on the CPU, one at a time. A tensor over BLOCK_BYTES (the embedding and an untied LM
head, V x d: 412 MB at 1.2B) is produced and copied in row blocks instead (_RowDraw, _row_blocks), so
a rank's extra host memory while filling is about one block, not the whole tensor; the values are
the same as one draw of the whole tensor (see _RowDraw).
"""

from __future__ import annotations

import bisect
import copy
import hashlib
import json
import math
from collections.abc import Callable
from pathlib import Path
from types import EllipsisType

import torch
from safetensors import safe_open
from torch import nn
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from stepc.runtime.loop.faults import pause_point
from stepc.runtime.model.growth import LayerSource, layer_sources
from stepc.runtime.model.lora import LoRALinear, _kaiming_a_, apply_adapters
from stepc.runtime.model.llama import StepcLlama, runtime_config
from stepc.schema.plan import StagePlan
from stepc.schema.spec import Spec, Step

# name of a tensor in its module -> a function of the rank's index (slices) returning those values
Fill = dict[str, Callable[[tuple[slice, ...]], torch.Tensor]]

FPI_ZEROED = ("self_attn.o_proj.weight", "mlp.down_proj.weight")

# Tensors larger than this are drawn, read and copied in row blocks of about this size (module docstring).
BLOCK_BYTES = 16 * 2**20


def module_seed(seed: int, name: str) -> int:
    digest = hashlib.sha256(f"{seed}/{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def meta_fresh_model(spec: Spec, num_layers: int) -> StepcLlama:
    with torch.device("meta"):
        return StepcLlama(runtime_config(spec.model, num_layers)).float()


# ----------------------------------------------------------------------------------------- filling

def _local_index(target: torch.Tensor, shape: torch.Size) -> tuple[slice, ...]:
    """The slices of the full tensor that this rank holds (everything for a plain tensor)."""
    if isinstance(target, DTensor):
        local, offset = compute_local_shape_and_global_offset(shape, target.device_mesh, target.placements)
        return tuple(slice(o, o + n) for o, n in zip(offset, local))
    return tuple(slice(0, n) for n in shape)


def _row_blocks(index: tuple[slice, ...], block_bytes: int) -> list[tuple[slice | EllipsisType, tuple[slice, ...]]]:
    """The rank's index cut into row blocks of about `block_bytes` (fp32 values): for each, the rows of
    the local tensor and the index of the full tensor it receives."""
    if not index:
        return [(..., index)]
    rows, rest = index[0], index[1:]
    row_bytes = 4 * math.prod(s.stop - s.start for s in rest)
    step = max(1, block_bytes // max(1, row_bytes))
    return [(slice(a - rows.start, min(a + step, rows.stop) - rows.start), (slice(a, min(a + step, rows.stop)), *rest))
            for a in range(rows.start, rows.stop, step)] or [(..., index)]


@torch.no_grad()
def fill_model(model: nn.Module, fills: Callable[[str, nn.Module], Fill], block_bytes: int = BLOCK_BYTES) -> None:
    """Copy every parameter's and buffer's local part from `fills(module_name, module)`, in row blocks
    of about `block_bytes`; each tensor (a tied weight is one tensor) is filled once, by the first
    module that owns it."""
    done: set[int] = set()
    for mod_name, module in model.named_modules():
        own = [(n, t) for n, t in list(module._parameters.items()) + list(module._buffers.items())
               if t is not None and id(t) not in done]
        if not own:
            continue
        values = fills(mod_name, module)
        for name, tensor in own:
            local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
            for rows, index in _row_blocks(_local_index(tensor, tensor.shape), block_bytes):
                local[rows].copy_(values[name](index).to(local.dtype))
            done.add(id(tensor))


def _stand_in(module: nn.Module, device: torch.device) -> nn.Module:
    """The module's own tensors at full size on `device` (same class, same attributes, no children)."""
    stand_in = copy.copy(module)
    stand_in._parameters = {n: None if p is None else nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device=device),
                                                                    requires_grad=False)
                            for n, p in module._parameters.items()}  # None entries stay: `bias is None` is read
    stand_in._buffers = {n: None if b is None else torch.empty(b.shape, dtype=b.dtype, device=device)
                         for n, b in module._buffers.items()}
    stand_in._modules = {}
    return stand_in


class _RowDraw:
    """Rows of a large nn.Embedding's or bias-free nn.Linear's weight as `_init_weights` draws the whole
    tensor on the CPU, produced one block of rows at a time (requests in ascending rows, as fill_model
    makes them; an earlier row restarts the draw from the seed).

    Why this equals one draw: the CPU's normal_ fills a contiguous tensor of 16 or more elements with
    uniforms taken from the generator in order and transforms them 16 at a time, redrawing the last 16
    when the size is not a multiple of 16. Blocks whose sizes are multiples of 16 elements (a multiple of
    16 rows) followed by a last block of at least 16 elements therefore take the same uniforms in the same
    groups. tests/test_meta_init.py checks the equality on the installed torch, at sizes that are and are
    not multiples of 16; a torch whose kernel drew otherwise would fail it, not change values silently."""

    def __init__(self, model: StepcLlama, module: nn.Module, seed: int, block_bytes: int) -> None:
        self.model, self.module, self.seed = model, module, seed
        rows, self.cols = module.weight.shape
        step = max(16, block_bytes // (4 * self.cols) // 16 * 16)
        self.bounds = [*range(0, rows, step), rows]
        if len(self.bounds) > 2 and (self.bounds[-1] - self.bounds[-2]) * self.cols < 16:
            del self.bounds[-2]  # a last block under 16 elements would be drawn by another kernel
        self._restart()

    def _restart(self) -> None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            self.state = torch.random.get_rng_state()
        self.drawn, self.block = 0, torch.empty(0)  # blocks drawn so far; the last of them

    def _draw(self, k: int) -> torch.Tensor:
        if k < self.drawn - 1:
            self._restart()
        while self.drawn <= k:
            start, stop = self.bounds[self.drawn], self.bounds[self.drawn + 1]
            stand_in = copy.copy(self.module)
            stand_in._parameters = {n: None if p is None else nn.Parameter(torch.empty(stop - start, self.cols),
                                                                            requires_grad=False)
                                    for n, p in self.module._parameters.items()}
            stand_in._buffers, stand_in._modules = {}, {}
            if isinstance(stand_in, nn.Embedding) and stand_in.padding_idx is not None:
                pad = self.module.padding_idx
                stand_in.padding_idx = pad - start if start <= pad < stop else None
            with torch.random.fork_rng(devices=[]):
                torch.random.set_rng_state(self.state)
                self.model._init_weights(stand_in)
                self.state = torch.random.get_rng_state()
            self.drawn, self.block = self.drawn + 1, stand_in.weight.detach()
        return self.block

    def __call__(self, index: tuple[slice, ...]) -> torch.Tensor:
        rows, rest = index[0], index[1:]
        if rows.start >= rows.stop:  # a rank without rows of this tensor
            return torch.empty(0, self.cols)[(slice(None), *rest)]
        pieces = []
        for k in range(bisect.bisect_right(self.bounds, rows.start) - 1, len(self.bounds) - 1):
            start, stop = self.bounds[k], self.bounds[k + 1]
            if start >= rows.stop:
                break
            pieces.append(self._draw(k)[max(rows.start, start) - start:min(rows.stop, stop) - start])
        return torch.cat(pieces)[(slice(None), *rest)]


def _draws_in_rows(module: nn.Module, device: torch.device, block_bytes: int) -> bool:
    """Whether `module`'s weight is drawn in row blocks: on the CPU, an embedding or bias-free linear over
    `block_bytes` (a GPU draws the whole tensor in its own memory, by another generator)."""
    weight = module._parameters.get("weight")
    return (device.type == "cpu" and isinstance(module, (nn.Embedding, nn.Linear)) and weight is not None
            and module._parameters.get("bias") is None and not module._buffers
            and 4 * weight.numel() > block_bytes)


def _seeded_fill(model: StepcLlama, seed: int, device: torch.device,
                 block_bytes: int = BLOCK_BYTES) -> Callable[[str, nn.Module], Fill]:
    def fills(name: str, module: nn.Module) -> Fill:
        if _draws_in_rows(module, device, block_bytes):
            return {"weight": _RowDraw(model, module, module_seed(seed, name), block_bytes)}
        stand_in = _stand_in(module, device)
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(module_seed(seed, name))  # seeds the CPU's and every GPU's generator
            model._init_weights(stand_in)
        full = {**stand_in._parameters, **stand_in._buffers}
        return {n: (lambda index, t=t: t[index]) for n, t in full.items() if t is not None}

    return fills


def init_fresh(model: StepcLlama, seed: int, device: torch.device | None = None, block_bytes: int = BLOCK_BYTES) -> None:
    """Initialise a materialised (plain or sharded) fresh model; see the module docstring. The
    values are drawn on `device`'s type: pass the model's GPU to draw them there (default: CPU)."""
    fill_model(model, _seeded_fill(model, seed, device or torch.device("cpu"), block_bytes), block_bytes)


# ------------------------------------------------------------------------------------------- growth

class _Export:
    """Stage i-1's safetensors export, read tensor by tensor (rows on demand)."""

    def __init__(self, path: Path) -> None:
        self.where: dict[str, Path] = {}
        for file in sorted(path.glob("*.safetensors")):
            with safe_open(str(file), framework="pt") as handle:
                for key in handle.keys():
                    self.where[key] = file
        config = json.loads((path / "config.json").read_text())
        self.num_layers = int(config["num_hidden_layers"])

    def read(self, key: str, index: tuple[slice, ...]) -> torch.Tensor:
        with safe_open(str(self.where[key]), framework="pt") as handle:
            return handle.get_slice(key)[index]


def meta_grown_model(spec: Spec, previous_export: Path, stage: StagePlan, block_bytes: int = BLOCK_BYTES
                     ) -> tuple[StepcLlama, list[LoRALinear], list[int], Callable[[StepcLlama], None]]:
    """The grown model on meta, its adapters, the indices of its new layers, and the function that
    fills it once materialised (after sharding). Mirrors the eager grown_model of tests/eager_reference.py step for step."""
    step = spec.step
    seed = spec.experiment.seed + 1000 * stage.index
    export = _Export(previous_export)
    num_old = export.num_layers
    # the layers to add: stage.new_layers for a growth stage; none when the export already has them all
    # (ReLoRA's adapter phase, and method "sft", whose plan trains all of init_from's layers as "new")
    grow = stage.total_layers - num_old
    if grow < 0:
        raise ValueError(f"{previous_export} has {num_old} layers, more than stage {stage.index}'s {stage.total_layers}")
    sources = layer_sources(num_old, grow, step.growth_operator, step.position, seed, step.stack_block)
    model = meta_fresh_model(spec, len(sources))
    new_layers = [i for i, src in enumerate(sources) if src.new]
    old = [i for i, src in enumerate(sources) if not src.new]
    if spec.method.old_layers == "trained":  # classic model growth: the whole grown model trains, no adapters
        old = []
    adapters = apply_adapters(model, old, step.lora_rank, step.lora_alpha, None)  # A drawn at fill time
    if spec.train.precision == "bf16":
        for adapter in adapters:
            adapter.base.to(torch.bfloat16)
        for i in old:
            for norm in (model.model.layers[i].input_layernorm, model.model.layers[i].post_attention_layernorm):
                norm.to(torch.bfloat16)

    def fill(materialised: StepcLlama) -> None:
        generator = torch.Generator().manual_seed(seed)
        lora_a = {}
        for i in old:  # apply_adapters' order: layer, then ADAPTED_PROJECTIONS
            for name, module in materialised.model.layers[i].named_modules():
                if isinstance(module, LoRALinear):
                    lora_a[(i, name)] = _kaiming_a_(torch.empty(module.lora_A.shape, dtype=torch.float32), generator)
        assert len(lora_a) == len(adapters)
        fill_model(materialised, _grown_fill(materialised, export, sources, step, lora_a, spec.experiment.seed), block_bytes)
        pause_point("growth")  # tests only: kill -9 mid-growth, the grown shards filled (see stepc/runtime/loop/faults.py)

    return model, adapters, new_layers, fill


def _grown_fill(model: StepcLlama, export: _Export, sources: list[LayerSource], step: Step,
                lora_a: dict[tuple[int, str], torch.Tensor], seed: int) -> Callable[[str, nn.Module], Fill]:
    seeded = _seeded_fill(model, seed, torch.device("cpu"))  # buffers only (rotary frequencies): no randomness involved

    def read(key: str) -> Callable[[tuple[slice, ...]], torch.Tensor]:
        return lambda index: export.read(key, index)

    def fills(name: str, module: nn.Module) -> Fill:
        own = [n for n, t in module._parameters.items() if t is not None]
        # buffers (rotary frequencies) are computed, not drawn; only a module that has them asks `seeded`
        out: Fill = {n: f for n, f in seeded(name, module).items() if n in module._buffers} \
            if any(b is not None for b in module._buffers.values()) else {}
        if not name.startswith("model.layers."):
            for n in own:
                key = f"{name}.{n}"
                if key not in export.where and key == "lm_head.weight":  # tied: stored once
                    key = "model.embed_tokens.weight"
                out[n] = read(key)
            return out
        i, rest = name[len("model.layers."):].split(".", 1) if "." in name[len("model.layers."):] \
            else (name[len("model.layers."):], "")
        src = sources[int(i)]
        j = src.parents[0]
        for n in own:
            local = f"{rest}.{n}" if rest else n
            if not src.new:
                if n == "lora_A":
                    out[n] = lambda index, a=lora_a[(int(i), rest)]: a[index]
                elif n == "lora_B":
                    out[n] = _zeros
                else:
                    out[n] = read(f"model.layers.{j}.{local.replace('.base.', '.')}")
            elif step.fpi and local in FPI_ZEROED:
                out[n] = _zeros
            elif len(src.parents) == 2:  # interpolation-mean
                lower, upper = read(f"model.layers.{j}.{local}"), read(f"model.layers.{src.parents[1]}.{local}")
                out[n] = lambda index, lo=lower, up=upper: _mean(lo(index), up(index))
            else:
                out[n] = read(f"model.layers.{j}.{local}")
        return out

    return fills


def _zeros(index: tuple[slice, ...]) -> torch.Tensor:
    """Zeros of the rank's part only (never the whole tensor's shape)."""
    return torch.zeros(tuple(s.stop - s.start for s in index))


def _mean(lower: torch.Tensor, upper: torch.Tensor) -> torch.Tensor:
    """growth._source_state_dict's average: accumulate in (at least) fp32, halve, back to the dtype."""
    acc = torch.promote_types(lower.dtype, torch.float32)
    return ((lower.to(acc) + upper.to(acc)) / 2).to(lower.dtype)
