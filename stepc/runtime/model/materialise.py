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
full tensors on the CPU, one at a time. Peak extra host memory: the largest single tensor (the
embedding, V x d x 4 bytes).
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Callable
from pathlib import Path

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


@torch.no_grad()
def fill_model(model: nn.Module, fills: Callable[[str, nn.Module], Fill]) -> None:
    """Copy every parameter's and buffer's local part from `fills(module_name, module)`; each
    tensor (a tied weight is one tensor) is filled once, by the first module that owns it."""
    done: set[int] = set()
    for mod_name, module in model.named_modules():
        own = [(n, t) for n, t in list(module._parameters.items()) + list(module._buffers.items())
               if t is not None and id(t) not in done]
        if not own:
            continue
        values = fills(mod_name, module)
        for name, tensor in own:
            index = _local_index(tensor, tensor.shape)
            local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
            local.copy_(values[name](index).to(local.dtype))
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


def _seeded_fill(model: StepcLlama, seed: int, device: torch.device) -> Callable[[str, nn.Module], Fill]:
    def fills(name: str, module: nn.Module) -> Fill:
        stand_in = _stand_in(module, device)
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(module_seed(seed, name))  # seeds the CPU's and every GPU's generator
            model._init_weights(stand_in)
        full = {**stand_in._parameters, **stand_in._buffers}
        return {n: (lambda index, t=t: t[index]) for n, t in full.items() if t is not None}

    return fills


def init_fresh(model: StepcLlama, seed: int, device: torch.device | None = None) -> None:
    """Initialise a materialised (plain or sharded) fresh model; see the module docstring. The
    values are drawn on `device`'s type: pass the model's GPU to draw them there (default: CPU)."""
    fill_model(model, _seeded_fill(model, seed, device or torch.device("cpu")))


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


def meta_grown_model(spec: Spec, previous_export: Path, stage: StagePlan
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
        fill_model(materialised, _grown_fill(materialised, export, sources, step, lora_a, spec.experiment.seed))
        pause_point("growth")  # tests only: kill -9 mid-growth, the grown shards filled (see stepc/runtime/loop/faults.py)

    return model, adapters, new_layers, fill


def _grown_fill(model: StepcLlama, export: _Export, sources: list[LayerSource], step: Step,
                lora_a: dict[tuple[int, str], torch.Tensor], seed: int) -> Callable[[str, nn.Module], Fill]:
    seeded = _seeded_fill(model, seed, torch.device("cpu"))  # buffers only (rotary frequencies): no randomness involved

    def read(key: str) -> Callable[[tuple[slice, ...]], torch.Tensor]:
        return lambda index: export.read(key, index)

    def fills(name: str, module: nn.Module) -> Fill:
        own = [n for n, t in module._parameters.items() if t is not None]
        out: Fill = {n: f for n, f in seeded(name, module).items() if n in module._buffers}
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
                    out[n] = lambda index, s=module.lora_B.shape: torch.zeros(s)[index]
                else:
                    out[n] = read(f"model.layers.{j}.{local.replace('.base.', '.')}")
            elif step.fpi and local in FPI_ZEROED:
                out[n] = lambda index, s=module._parameters[n].shape: torch.zeros(s)[index]
            elif len(src.parents) == 2:  # interpolation-mean
                lower, upper = read(f"model.layers.{j}.{local}"), read(f"model.layers.{src.parents[1]}.{local}")
                out[n] = lambda index, lo=lower, up=upper: _mean(lo(index), up(index))
            else:
                out[n] = read(f"model.layers.{j}.{local}")
        return out

    return fills


def _mean(lower: torch.Tensor, upper: torch.Tensor) -> torch.Tensor:
    """growth._source_state_dict's average: accumulate in (at least) fp32, halve, back to the dtype."""
    acc = torch.promote_types(lower.dtype, torch.float32)
    return ((lower.to(acc) + upper.to(acc)) / 2).to(lower.dtype)
