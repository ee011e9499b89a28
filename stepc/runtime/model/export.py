"""Hugging Face export of a stage: adapters merged, standard LLaMA keys, safetensors, written atomically."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch
from transformers import LlamaForCausalLM

from stepc.runtime.model.export_seal import seal
from stepc.runtime.guard import EXPORT_DONE as DONE
from stepc.runtime.guard import is_exported
from stepc.runtime.model.lora import merged_state_dict
from stepc.runtime.model.llama import llama_config
from stepc.schema.spec import Spec

__all__ = ["DONE", "is_exported", "write_export"]


def write_export(state: dict[str, torch.Tensor], spec: Spec, num_layers: int, dest: Path,
                 tokenizer: Any = None) -> None:
    """Rank 0 only: build a plain LlamaForCausalLM from the merged weights and save_pretrained it.

    With the tokenizer saved beside it, the directory loads with AutoModelForCausalLM and
    AutoTokenizer alone, which is what lm-evaluation-harness's `--model hf` needs.
    """
    merged = merged_state_dict(state, spec.step.lora_alpha / spec.step.lora_rank)
    with torch.device("meta"):
        model = LlamaForCausalLM(llama_config(spec.model, num_layers))
    model.load_state_dict(merged, strict=True, assign=True)
    if spec.model.tie_embeddings:
        model.tie_weights()
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    if tokenizer is not None:
        from transformers import PreTrainedTokenizerFast

        from stepc.runtime.data.tokenizer import eos_id

        eos = tokenizer.id_to_token(eos_id(tokenizer))
        PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=eos, bos_token=eos, unk_token=eos,
                                model_max_length=spec.model.seq_len).save_pretrained(tmp)
    seal(tmp)  # the marker lists every file's size and sha256; the next stage checks them
    if dest.exists():
        shutil.rmtree(dest)
    os.replace(tmp, dest)
