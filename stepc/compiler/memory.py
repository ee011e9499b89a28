"""The memory model: bytes of model states per stage as a linear function of the stage layout.

A stage that adds `new` layers on top of `old` frozen ones holds
    TRAINED bytes x (new * P_layer + old * E + fixed)  +  FROZEN bytes x old * P_layer  (+ step scalars)
which is Eq. 2 of the paper when P_layer = 12 d^2 + 2 d (Eq. 4), E = 19 r d (Eq. 5), fixed = 0,
16 bytes per trained and 2 per frozen parameter. "exact" counts the real LlamaForCausalLM instead.
"""

from __future__ import annotations

from dataclasses import dataclass

from stepc.schema.spec import LINEAR_MAPS, Spec

TRAINED_BYTES = 16  # fp16/bf16 weight + gradient + fp32 master, momentum, variance (Eq. 1), or fp32 param+grad+2 moments
STEP_SCALAR_BYTES = 4  # torch AdamW keeps one fp32 `step` tensor per parameter tensor


@dataclass(frozen=True)
class Costs:
    """Parameter and tensor counts that make stage bytes linear in (new layers, old layers)."""

    layer_params: int  # P_layer
    adapter_params: int  # E(P_layer): adapter parameters on one frozen layer
    fixed_params: int  # embeddings, head, final norm: trained in every stage (0 in the paper's model)
    frozen_bytes: int  # bytes per frozen parameter
    layer_tensors: int = 0  # parameter tensors per layer (for AdamW step scalars; 0 = not counted)
    adapter_tensors: int = 0
    fixed_tensors: int = 0
    step_bytes: int = 0
    ranks: int = 1  # "device": FSDP shards parameters, gradients and moments over this many ranks
    activation_layer_bytes: int = 0  # "device": activations one decoder layer keeps per rank
    activation_fixed_bytes: int = 0  # "device": logits, all-gather buffers, a recomputed layer

    def stage_bytes(self, new: int, old: int) -> int:
        """Bytes of a stage that trains `new` layers above `old` frozen, adapted layers (per rank if ranks > 1)."""
        trained = new * self.layer_params + old * self.adapter_params + self.fixed_params
        tensors = new * self.layer_tensors + old * self.adapter_tensors + self.fixed_tensors
        sharded = TRAINED_BYTES * trained + self.frozen_bytes * old * self.layer_params
        # AdamW's step scalars are not sharded: every rank holds one per parameter tensor.
        return (-(-sharded // self.ranks) + self.step_bytes * tensors
                + (new + old) * self.activation_layer_bytes + self.activation_fixed_bytes)

    def trainable_params(self, new: int, old: int) -> int:
        return new * self.layer_params + old * self.adapter_params + self.fixed_params

    def frozen_params(self, new: int, old: int) -> int:
        return old * self.layer_params


def paper_costs(d: int, r: int) -> Costs:
    """Eq. 4 and Eq. 5 exactly: a LLaMA layer without GQA, MLP width 8/3 d, rank-r adapters."""
    return Costs(layer_params=12 * d * d + 2 * d, adapter_params=19 * r * d, fixed_params=0, frozen_bytes=2)


def exact_layer_params(spec: Spec) -> tuple[int, int, int]:
    """(layer, adapter, fixed) parameter counts of the real transformers LlamaForCausalLM."""
    m = spec.model
    d, inter = m.hidden_size, m.intermediate_size
    kv = m.kv_dim
    shapes = {  # (in, out) of each linear map; LLaMA has no biases
        "q_proj": (d, d), "k_proj": (d, kv), "v_proj": (d, kv), "o_proj": (d, d),
        "gate_proj": (d, inter), "up_proj": (d, inter), "down_proj": (inter, d),
    }
    layer = sum(i * o for i, o in shapes.values()) + 2 * d  # two RMSNorm weights
    adapter = sum(spec.step.lora_rank * (i + o) for i, o in shapes.values())
    fixed = m.vocab_size * d * (1 if m.tie_embeddings else 2) + d  # embeddings, head, final norm
    return layer, adapter, fixed


def exact_costs(spec: Spec) -> Costs:
    """Counts of the model the runtime builds; frozen weights are bf16 under bf16 precision, else fp32."""
    layer, adapter, fixed = exact_layer_params(spec)
    fixed_tensors = 2 if spec.model.tie_embeddings else 3
    return Costs(
        layer_params=layer, adapter_params=adapter, fixed_params=fixed,
        frozen_bytes=2 if spec.train.precision == "bf16" else 4,
        layer_tensors=len(LINEAR_MAPS) + 2, adapter_tensors=2 * len(LINEAR_MAPS), fixed_tensors=fixed_tensors,
        step_bytes=STEP_SCALAR_BYTES,
    )


def device_costs(spec: Spec) -> Costs:
    """Per-GPU peak estimate: exact model states sharded over the ranks, plus activations.

    Activations per token of one decoder layer (kept for backward, in the compute dtype): the two
    norm inputs and outputs, q/k/v, the attention output, gate, up, SiLU(gate) and their product
    (6 d + 2 kv + 4 I elements; sdpa/flash attention keeps no s x s scores), plus the norms' fp32
    upcasts (2 d x 4 bytes). With activation checkpointing a layer keeps only its input (d) and
    one layer is recomputed at a time. Fixed: the fp32 logits and their gradient (V x 8 bytes per
    token, plus the compute-dtype logits), two layers' all-gathered parameters (FSDP prefetch) and
    the unsharded root (embeddings, head). Frozen layers with adapters still back-propagate, so
    they keep activations too. An estimate: not yet checked against a GPU measurement here.
    """
    base = exact_costs(spec)
    m, tr, la = spec.model, spec.train, spec.launch
    ranks = 1 if spec.experiment.method == "galore" else la.nnodes * la.nproc_per_node
    elt = 2 if tr.precision == "bf16" else 4
    d, inter = m.hidden_size, m.intermediate_size
    kv = m.kv_dim
    tokens = tr.micro_batch_size * m.seq_len
    full_layer = tokens * (elt * (6 * d + 2 * kv + 4 * inter) + 8 * 2 * d)
    per_layer = tokens * elt * d if tr.activation_checkpointing else full_layer
    fixed = tokens * m.vocab_size * (elt + 8) + 2 * elt * base.layer_params + elt * base.fixed_params
    if tr.activation_checkpointing:
        fixed += full_layer
    return Costs(**{**base.__dict__, "ranks": ranks, "activation_layer_bytes": per_layer, "activation_fixed_bytes": fixed})


def costs_for(spec: Spec) -> Costs:
    """The cost model named by memory.accounting."""
    if spec.memory.accounting == "paper":
        return paper_costs(spec.model.hidden_size, spec.step.lora_rank)
    if spec.memory.accounting == "device":
        return device_costs(spec)
    return exact_costs(spec)


def vanilla_bytes(costs: Costs, num_layers: int) -> int:
    """Eq. 1: all layers trained at once."""
    return costs.stage_bytes(num_layers, 0)


def layout_peaks(costs: Costs, layers: list[int]) -> list[int]:
    """Bytes of every stage of a layout (new layers per stage), Eq. 2 for each i."""
    peaks, old = [], 0
    for new in layers:
        peaks.append(costs.stage_bytes(new, old))
        old += new
    return peaks


def galore_bytes(spec: Spec, costs: Costs) -> int:
    """GaLore model states: weights and gradients (16-bit) plus fp32 master copy for every parameter,
    and for each 2-D layer matrix (m x n) Adam moments in the rank-r projected space plus the projector.

    Outside the decoder layers (embeddings, head, norms) GaLore keeps ordinary AdamW state.
    """
    m, r = spec.model, spec.step.galore_rank
    d, inter = m.hidden_size, m.intermediate_size
    kv = m.kv_dim
    if spec.memory.accounting == "paper":
        inter, kv = round(8 / 3 * d), d
    mats = [(d, d), (d, kv), (d, kv), (d, d), (d, inter), (d, inter), (inter, d)]
    projected = sum(2 * 4 * r * max(a, b) + 4 * min(a, b) * r for a, b in mats)  # moments r x max, projector min x r
    per_layer = 8 * costs.layer_params + projected
    return m.num_layers * per_layer + 16 * costs.fixed_params
