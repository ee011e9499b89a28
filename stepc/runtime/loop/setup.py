"""A stage's setup, before its first step: what the stage is (Stage), its data, and its model and
optimizer built on the meta device, sharded, filled and (for a resume) restored by the caller.

    data: the prepared shards, fingerprint-checked  ->  StageData (sampler, eval sets, tokenizer)
    model: meta (fresh, or grown from stage i-1's export) -> checkpoint(compile(forward)) per layer
           -> fully_shard per layer + root (HSDP: on a nodes x ranks mesh) -> each rank fills its
           shards (model/materialise.py) -> AdamW  ->  Trainee (model, optimizer, adapters)
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from stepc.rundir import RunDir
from stepc.runtime.data.instructions import InstructionSampler, open_examples
from stepc.runtime.data.prepared import open_prepared, training_sets
from stepc.runtime.data.sampler import BlendSampler, BlockSampler
from stepc.runtime.data.tokenizer import id_bound
from stepc.runtime.guard import RuntimeFailure, check_data_fingerprint
from stepc.runtime.model.llama import wrap_decoder_layers
from stepc.runtime.model.lora import LoRALinear
from stepc.runtime.model.materialise import init_fresh, meta_fresh_model, meta_grown_model
from stepc.schema.plan import Plan, StagePlan
from stepc.schema.spec import Spec


@dataclass(frozen=True)
class Stage:
    """Everything about this stage that the manifest and the launch fix, resolved once."""

    run_dir: Path
    spec: Spec
    plan: Plan
    stage: StagePlan  # this stage's part of the plan
    rank: int
    world: int
    device: torch.device

    @property
    def index(self) -> int:
        return self.stage.index

    @property
    def dir(self) -> Path:
        return RunDir(self.run_dir).stage_dir(self.index)

    @property
    def last(self) -> bool:
        return self.index == len(self.plan.stages)

    @property
    def sharded(self) -> bool:
        """FSDP2 unless there is nothing to shard: one CPU rank runs the plain module (FSDP2's
        all-gathers and DTensor dispatch cost ~35% there for no memory gain). A single GPU keeps
        FSDP2 for its bf16 mixed-precision policy. GaLore is never sharded (not FSDP-aware)."""
        if not self.spec.method.shards:
            return False
        return self.world > 1 or self.device.type == "cuda"

    @property
    def grad_accum(self) -> int:
        tr, seq = self.spec.train, self.spec.model.seq_len
        return tr.global_batch_tokens // (seq * tr.micro_batch_size * self.world)

    @property
    def replicas(self) -> int:
        """Copies of the model states across the job: the nodes under [launch] sharding = "hybrid"
        (HSDP: each node shards one copy over its own ranks), else 1 (FSDP over every rank)."""
        if self.spec.launch.sharding != "hybrid" or not self.sharded:
            return 1
        local = int(os.environ.get("LOCAL_WORLD_SIZE", self.world))
        if self.world % local:
            raise RuntimeFailure(f"sharding = \"hybrid\" needs the same number of ranks on every node; {self.world} ranks "
                                 f"do not split into nodes of {local}")
        return self.world // local


@dataclass(frozen=True)
class StageData:
    sampler: BlockSampler | BlendSampler | InstructionSampler
    evals: dict[str, Any]  # name -> (blocks, indices): the held-out split(s) and the named validation sets
    tokenizer: Any  # tokenizers.Tokenizer, saved beside the export


@dataclass
class Trainee:
    """The model being trained and what belongs to it."""

    model: Any  # StepcLlama, FSDP2-sharded or plain
    optimizer: torch.optim.Optimizer
    adapters: list[LoRALinear] = field(default_factory=list)
    new_layers: list[int] = field(default_factory=list)  # indices of the layers this stage inserted


def load_data(st: Stage, allow: set[str]) -> StageData:
    """Memory-map the shards `stepc data prepare` wrote before torchrun (no rank tokenises or waits),
    check the data fingerprint; the training sampler and the eval sets (held-out split, named sets).
    Method "sft": the prepared instruction examples, (input_ids, labels) rows, no eval sets."""
    if st.spec.method.objective == "instructions":
        examples = open_examples(st.run_dir, st.spec, st.plan)
        check_data_fingerprint(st.run_dir, examples.fingerprint, st.rank, allow)
        # the tokenizer is init_from's, saved again beside this run's export
        return StageData(InstructionSampler(examples, st.spec.experiment.seed, st.spec.model.seq_len), {},
                         examples.tokenizer)
    prepared = open_prepared(st.run_dir, st.spec.data, st.spec.model.seq_len)
    tok = prepared.tokenizer
    if id_bound(tok) > st.spec.model.vocab_size:  # the largest id, not the token count: ids may have gaps
        raise RuntimeFailure(f"the tokenizer's ids reach {id_bound(tok) - 1} but model.vocab_size is {st.spec.model.vocab_size}")
    check_data_fingerprint(st.run_dir, prepared.fingerprint, st.rank, allow)
    sampler, evals = training_sets(prepared, st.spec.data.holdout_fraction, st.spec.experiment.seed,
                                   st.spec.data.weights_at(st.stage.index))
    return StageData(sampler, evals, tok)


def build(st: Stage, prev_export: Path | None) -> Trainee:
    """The stage's model on `meta` (no rank ever holds the whole model), wrapped, sharded, filled,
    and its optimizer (with no state yet: the caller resumes or carries)."""
    spec = st.spec
    adapters: list[LoRALinear] = []
    new_layers: list[int] = []
    if prev_export is None:
        model = meta_fresh_model(spec, st.stage.total_layers)

        def fill(m):
            init_fresh(m, spec.experiment.seed, st.device)
    else:
        model, adapters, new_layers, fill = meta_grown_model(spec, prev_export, st.stage)
    prepare(model, st)
    fill(model)
    return Trainee(model, make_optimizer(model, spec, st.device), adapters, new_layers)


def prepare(model, st: Stage) -> None:
    """Activation checkpointing and compilation of each layer's forward (model.wrap_decoder_layers),
    then FSDP2 (one unit per decoder layer plus the root) on the meta model, then each rank allocates
    only its shards on the device (filled by the caller)."""
    wrap_decoder_layers(model, st.spec.train.compile, st.spec.train.activation_checkpointing)  # before sharding
    if st.sharded:
        mp = None
        if st.spec.train.precision == "bf16" and st.device.type == "cuda":
            mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        kwargs: dict[str, Any] = {"mp_policy": mp} if mp else {}
        if st.replicas > 1:  # HSDP: replicate over the nodes (dim 0), shard within a node (dim 1)
            kwargs["mesh"] = init_device_mesh(st.device.type, (st.replicas, st.world // st.replicas),
                                              mesh_dim_names=("replicate", "shard"))
        for layer in model.model.layers:
            fully_shard(layer, **kwargs)
        fully_shard(model, **kwargs)
    model.to_empty(device=st.device)
    if not st.sharded and st.spec.model.tie_embeddings:
        # to_empty gives every module its own tensor, so the head would train apart from the embedding
        # (and the export, which saves the embedding once, would lose the head); FSDP2 keeps the tie
        model.tie_weights()
    model.train()


def make_optimizer(model, spec: Spec, device: torch.device) -> torch.optim.Optimizer:
    """AdamW; decay on matrices (incl. adapters and embeddings), none on norms.

    GaLore (the method's optimizer): GaLoreAdamW, projecting the gradients of the decoder layers' 2-D weights.
    """
    tr, sp = spec.train, spec.step
    galore = spec.method.optimizer == "galore"
    decay, no_decay, projected = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if galore and p.ndim == 2 and ".layers." in name:
            projected.append(p)
        else:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": tr.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if galore:
        from galore_torch import GaLoreAdamW  # optional extra: pip install 'stepc[galore]'

        groups.append({"params": projected, "weight_decay": tr.weight_decay, "rank": sp.galore_rank,
                       "update_proj_gap": sp.galore_update_gap, "scale": sp.galore_scale, "proj_type": "std"})
        return GaLoreAdamW(groups, lr=tr.lr, betas=tuple(tr.betas), no_deprecation_warning=True)
    # CUDA: fused (one kernel for all tensors, works on FSDP2's DTensors). CPU: foreach (one dispatch
    # per op for all tensors; per-parameter DTensor dispatch doubled the step time).
    kind = {"fused": True} if device.type == "cuda" else {"foreach": True}
    return torch.optim.AdamW(groups, lr=tr.lr, betas=tuple(tr.betas), **kind)


def predicted_state_bytes(st: Stage, model) -> int | None:
    """The compiler's exact prediction summed over the ranks: one copy of the model states per replica
    (HSDP), plus the AdamW step scalars every rank holds for its shards (exact counts one set)."""
    if st.stage.exact_model_state_bytes is None:  # GaLore: no tensor-level prediction
        return None
    tensors = sum(1 for p in model.parameters() if p.requires_grad)
    return st.stage.exact_model_state_bytes * st.replicas + 4 * tensors * (st.world - st.replicas)
