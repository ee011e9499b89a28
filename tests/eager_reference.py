"""The eager reference models of the tests: the whole model built on the CPU the plain way (load the
export, grow, adapt), which the runtime's sharded meta-device construction
(stepc.runtime.model.materialise) must reproduce bit for bit on any number of ranks."""

from __future__ import annotations

from pathlib import Path

import torch

from stepc.runtime.model.growth import grow_layers
from stepc.runtime.model.llama import StepcLlama, runtime_config
from stepc.runtime.model.lora import LoRALinear, apply_adapters
from stepc.runtime.model.materialise import init_fresh
from stepc.schema.plan import StagePlan
from stepc.schema.spec import Spec


def fresh_model(spec: Spec, num_layers: int, seed: int) -> StepcLlama:
    """The whole model on the CPU, every module seeded by its name (materialise.init_fresh)."""
    model = StepcLlama(runtime_config(spec.model, num_layers)).float()
    init_fresh(model, seed)
    return model


def grown_model(spec: Spec, previous_export: Path, stage: StagePlan) -> tuple[StepcLlama, list[LoRALinear], list[int]]:
    """Load stage i-1's merged export, insert the new layers, freeze the old
    ones behind adapters. Returns the model, its adapters and the indices of the new layers.
    """
    model = StepcLlama.from_pretrained(previous_export, dtype=torch.float32)
    model.config.use_cache = False
    step = spec.step
    seed = spec.experiment.seed + 1000 * stage.index
    new_layers = []
    if stage.new_layers:  # ReLoRA's LoRA phase adds no layer: adapters go on all of them
        new_layers = grow_layers(model, stage.new_layers, step.growth_operator, step.position, step.fpi, seed,
                                 block=step.stack_block)
    if spec.method.old_layers == "trained":  # classic model growth: the whole grown model trains
        return model, [], new_layers
    old = [i for i in range(len(model.model.layers)) if i not in set(new_layers)]
    generator = torch.Generator().manual_seed(seed)
    adapters = apply_adapters(model, old, step.lora_rank, step.lora_alpha, generator)
    if spec.train.precision == "bf16":
        for adapter in adapters:  # frozen weights need no fp32 master copy (Eq. 2's 2 bytes)
            adapter.base.to(torch.bfloat16)
        for i in old:
            for norm in (model.model.layers[i].input_layernorm, model.model.layers[i].post_attention_layernorm):
                norm.to(torch.bfloat16)
    return model, adapters, new_layers
