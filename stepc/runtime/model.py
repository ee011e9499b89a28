"""Build the stage's LlamaForCausalLM: fresh (stage 1), or grown from the previous stage's export.

Everything here runs before FSDP sharding, on the full model, identically on every rank.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from stepc.runtime.growth import grow_layers
from stepc.runtime.lora import LoRALinear, apply_adapters
from stepc.schema.plan import StagePlan
from stepc.schema.spec import Model, Spec


def llama_config(model: Model, num_layers: int) -> LlamaConfig:
    """A LlamaConfig from the manifest's normalised [model] table (never downloaded)."""
    return LlamaConfig(
        vocab_size=model.vocab_size, hidden_size=model.hidden_size, intermediate_size=model.intermediate_size,
        num_hidden_layers=num_layers, num_attention_heads=model.num_attention_heads,
        num_key_value_heads=model.num_key_value_heads, max_position_embeddings=model.seq_len,
        tie_word_embeddings=model.tie_embeddings, attention_bias=False, mlp_bias=False,
        bos_token_id=None, eos_token_id=None, pad_token_id=None, attn_implementation="sdpa",
    )


def fresh_model(spec: Spec, num_layers: int, seed: int) -> LlamaForCausalLM:
    """Same weights on every rank: the seed is set right before construction."""
    torch.manual_seed(seed)
    return LlamaForCausalLM(llama_config(spec.model, num_layers)).float()


def grown_model(spec: Spec, previous_export: Path, stage: StagePlan) -> tuple[LlamaForCausalLM, list[LoRALinear], list[int]]:
    """Load stage i-1's merged export, insert the new layers, freeze the old ones behind adapters.

    Returns the model, its adapters and the indices of the new layers.
    """
    model = LlamaForCausalLM.from_pretrained(previous_export, dtype=torch.float32)
    step = spec.step
    seed = spec.experiment.seed + 1000 * stage.index
    new_layers = []
    if stage.new_layers:  # ReLoRA's LoRA phase adds no layer: adapters go on all of them
        new_layers = grow_layers(model, stage.new_layers, step.growth_operator, step.position, step.fpi, seed)
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
