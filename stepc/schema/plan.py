"""The typed plan: what the compiler solved and the runtime executes, stage by stage.

Serialised into the manifest's "plan" key (field names are the manifest's keys, which tools
and tests rely on: see the README's run-directory section) and read back by the runtime with `Plan.model_validate`.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, frozen=True)


class StagePlan(_Frozen):
    index: int
    """1-based stage number; stage-<index>.sh runs it."""
    new_layers: int
    """n_i: decoder layers this stage adds (trained in full)."""
    total_layers: int
    """Decoder layers the model has during this stage (frozen + new)."""
    frozen_layers: int
    """Layers inherited from earlier stages, frozen behind ReLoRA adapters (0 for method "growth", which trains them)."""
    trainable_params: int
    """Parameters that get gradients and optimizer state (new layers, adapters; per the accounting)."""
    frozen_params: int
    """Parameters held without gradients (the frozen layers' weights)."""
    peak_bytes: int
    """Predicted peak memory of the stage under the plan's accounting."""
    exact_model_state_bytes: int | None
    """Model-state bytes of the real model (weights, grads, AdamW moments and step scalars), summed over
    ranks; the runtime measures the same quantity. None for GaLore (its projected state is not per tensor)."""
    steps: int
    """Optimizer steps this stage runs."""
    nominal_steps: int
    """The stage's nominal length: the horizon of its cosine schedule."""
    tokens: int
    """Training tokens this stage consumes (steps * global_batch_tokens)."""
    flops: float
    """Training FLOPs of this stage (Appendix E accounting)."""
    lr_offset: int
    """Where this stage starts on a shared LR schedule (ReLoRA's LoRA phase continues the warm start's); 0 otherwise."""
    data_step_offset: int
    """Global data step this stage starts at: each stage reads on where the previous one stopped."""
    carried_optimizer_params: int = 0
    """Parameters whose AdamW state (moments, step) this stage takes over from the previous stage's final
    checkpoint (step.carry_optimizer_state); 0 without carry and in stage 1. Memory is the same either way."""


class InitFrom(_Frozen):
    """The finished run an SFT run tunes, as `stepc compile` found it."""

    run_dir: str
    """[sft] init_from as written (relative to the launch directory)."""
    experiment: str
    """That run's experiment.name."""
    method: str
    """That run's experiment.method."""
    manifest_hash: str
    """That run's manifest hash."""
    export: dict[str, str]
    """Every file of its export (RUN_DIR/export) and the sha256 its seal recorded: the weights and
    tokenizer this run starts from. A stage refuses an export that no longer matches."""


class InstructionData(_Frozen):
    """One file of [sft] train as `stepc compile` read it."""

    path: str
    size: int
    sha256: str
    examples: int
    """Examples (non-blank lines) in the file."""


class SftPlan(_Frozen):
    """What method "sft" resolved at compile time: where it starts and how many examples it learns."""

    init_from: InitFrom | None
    """None only in `stepc plan`'s view of a run whose init_from has not finished (compile refuses it)."""
    data: list[InstructionData] | None
    """None only in `stepc plan`'s view when the data files are missing (compile refuses it)."""
    examples: int | None
    """Examples over all files; steps = ceil(epochs x examples / batch_size)."""
    unresolved: str | None = None
    """Why the steps are unknown (stepc plan only), or None."""


class Plan(_Frozen):
    method: str
    """experiment.method the plan was made for."""
    accounting: str
    """memory.accounting used for peak_bytes."""
    solver: str
    """How the layout was chosen: the ILP solver, or "pinned"."""
    flops_accounting: str
    """train.flops_accounting used for the FLOPs schedule."""
    budget_bytes: int | None
    """memory.budget in bytes (None: no budget given)."""
    vanilla_peak_bytes: int
    """Peak of training the whole target model at once, same accounting."""
    peak_bytes: int
    """max over stages of peak_bytes."""
    reduction: float
    """1 - peak_bytes / vanilla_peak_bytes."""
    flops_budget: float
    """The vanilla reference's training FLOPs (6 N T) that the stages share."""
    layers: list[int]
    """n_i per stage (the layout)."""
    stages: list[StagePlan]
    """The stages in order."""
    sft: SftPlan | None = Field(default=None, exclude_if=lambda v: v is None)  # absent from other methods' manifests
    """Method "sft" only: the init_from run and the instruction data it was compiled against."""
