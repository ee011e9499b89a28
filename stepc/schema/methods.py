"""The training methods, one registry entry each.

Everything the compiler plans and the runtime runs differently per method is one of these traits;
code asks `method_of(spec).<trait>`, never compares method names. A new method is one new entry
(and code only for a trait value no method had before).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class Method:
    name: str
    grows: bool
    """Stages add decoder layers: a layout of several stages, growth operators, grow_at, carry between stages."""
    solves_layout: bool
    """The layout is the ILP's optimum within memory.budget; otherwise it is fixed (one stage of every
    layer, or memory.layers pinned) and a budget is only checked against it."""
    old_layers: Literal["adapted", "trained"]
    """In a later stage, the layers earlier stages trained are frozen behind ReLoRA adapters, or keep training."""
    schedule: Literal["flops", "relora", "epochs"]
    """How steps are counted: Appendix E's FLOPs schedule over the layout's stages, each with its own LR
    schedule; ReLoRA's full-rank warm start then an adapter phase on one jagged cosine; or passes over
    a data set ([sft] epochs x the examples counted at compile time / [sft] batch_size)."""
    optimizer: Literal["adamw", "galore"]
    """AdamW, or GaLoreAdamW (rank-projected moments of the decoder layers' matrices)."""
    shards: bool
    """FSDP2 shards the model states over the ranks; False: the optimizer is not FSDP-aware, one rank."""
    starts_from: Literal["scratch", "export"] = "scratch"
    """Stage 1 starts from freshly initialised weights, or from a finished run's export ([sft] init_from:
    its model, weights and tokenizer)."""
    objective: Literal["documents", "instructions"] = "documents"
    """What the loss is taken over: packed documents ([data], every token), or instruction examples
    ([sft] train: one example per padded row, loss on the response tokens only)."""

    @property
    def stages_follow(self) -> bool:
        """More than one runtime stage: a later one can carry the optimizer state of an earlier one."""
        return self.grows or self.schedule == "relora"

    @property
    def adapters(self) -> bool:
        """Some stage trains ReLoRA adapters on frozen layers (lora_rank, merges and their optimizer reset apply)."""
        return self.old_layers == "adapted" and self.stages_follow


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("step", grows=True, solves_layout=True, old_layers="adapted", schedule="flops", optimizer="adamw", shards=True),
    Method("vanilla", grows=False, solves_layout=False, old_layers="adapted", schedule="flops", optimizer="adamw",
           shards=True),
    Method("relora", grows=False, solves_layout=False, old_layers="adapted", schedule="relora", optimizer="adamw",
           shards=True),
    Method("galore", grows=False, solves_layout=False, old_layers="adapted", schedule="flops", optimizer="galore",
           shards=False),
    Method("growth", grows=True, solves_layout=False, old_layers="trained", schedule="flops", optimizer="adamw",
           shards=True),
    Method("sft", grows=False, solves_layout=False, old_layers="trained", schedule="epochs", optimizer="adamw",
           shards=True, starts_from="export", objective="instructions"),
)}

MethodName = Literal["step", "vanilla", "relora", "galore", "growth", "sft"]
assert set(MethodName.__args__) == set(METHODS)  # the spec's choices are the registry's entries




def names_with(trait) -> str:
    """The methods that have a trait, for messages: '"step" or "growth"'."""
    return " or ".join(f'"{name}"' for name, m in METHODS.items() if trait(m))
