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
    activation_adapter_bytes: int = 0  # "device": extra activations of one frozen layer's adapters
    accumulated_grad_bytes: int = 0  # "device": per trainable parameter, unsharded, under gradient accumulation

    def stage_bytes(self, new: int, old: int) -> int:
        """Bytes of a stage that trains `new` layers above `old` frozen, adapted layers (per rank if ranks > 1)."""
        trained = new * self.layer_params + old * self.adapter_params + self.fixed_params
        tensors = new * self.layer_tensors + old * self.adapter_tensors + self.fixed_tensors
        sharded = TRAINED_BYTES * trained + self.frozen_bytes * old * self.layer_params
        # AdamW's step scalars are not sharded: every rank holds one per parameter tensor.
        return (-(-sharded // self.ranks) + self.step_bytes * tensors + self.accumulated_grad_bytes * trained
                + (new + old) * self.activation_layer_bytes + old * self.activation_adapter_bytes
                + self.activation_fixed_bytes)

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


LOSS_CHUNK_TOKENS = 2048  # stepc.runtime.loss.CHUNK_TOKENS: tokens whose logits exist at a time


def device_costs(spec: Spec) -> Costs:
    """Per-GPU peak estimate: exact model states sharded over the ranks, plus what a training step
    adds on top of them at its peak (the start of the backward pass), per rank.

    Saved activations of one decoder layer, per token (elt = 2 bytes under bf16, 4 under fp32),
    as counted with saved_tensors_hooks on the runtime's model (tests/test_device_memory.py):
      each RMSNorm   4 d + 4   its input upcast to fp32 and the fp32 1/rms (under fp32 the upcast is
                               the input itself), + 2 elt d: the normalised input (for the weight's
                               gradient) and its product with the weight (the next linear maps' input)
      attention      elt (2 d + 2 kv) + 4 h: q, k, v and the output kept by SDPA (no s x s scores),
                               the per-head fp32 log-sum-exp; o_proj reads the output in place
      MLP            4 elt I: gate, up, SiLU(gate) and the product (down_proj's input)
    Frozen layers back-propagate too (the embeddings below them are trained), so they keep the same
    plus their adapters' rank-r intermediates (7 r elt). With activation checkpointing a layer keeps
    only its input (elt d) and one layer at a time is recomputed in full.

    Fixed (one per rank): the chunked LM-head loss - chunk logits in fp32, their softmax-gradient in
    the compute dtype (and its fp32 upcast under bf16), the head's gradient accumulated in fp32 and
    cast back, the hidden states' gradient and copy (tokens x d x elt each) - plus the final norm;
    FSDP2's all-gathered compute-dtype parameters of the root (embeddings, head) and of two layers
    (the current one and the prefetched next); the root's unsharded gradient (alive from the head's
    gradient at the start of backward to the end of it) and one layer's unsharded gradient with its
    fp32 reduce-scatter buffer. Under gradient accumulation (more than one micro-batch per step)
    FSDP2 keeps every unsharded gradient between micro-batches, in fp32 (reduce dtype): 4 bytes per
    trainable parameter, not divided by the ranks. The loss returns no logits, so nothing of the
    previous micro-batch outlives it. Not included: the CUDA caching allocator's reserved-minus-
    allocated slack (fragmentation), which the runtime reports separately as peak_reserved_bytes.
    """
    base = exact_costs(spec)
    m, tr, la = spec.model, spec.train, spec.launch
    galore = spec.experiment.method == "galore"
    ranks = 1 if galore else la.nnodes * la.nproc_per_node
    elt = 2 if tr.precision == "bf16" else 4
    d, inter, kv, heads = m.hidden_size, m.intermediate_size, m.kv_dim, m.num_attention_heads
    tokens = tr.micro_batch_size * m.seq_len
    norm = 4 * d + 4 + 2 * elt * d
    full_layer = tokens * (2 * norm + elt * (2 * d + 2 * kv + 4 * inter) + 4 * heads)
    per_layer = tokens * elt * d if tr.activation_checkpointing else full_layer
    adapter = 0 if tr.activation_checkpointing else tokens * len(LINEAR_MAPS) * spec.step.lora_rank * elt
    chunk = min(LOSS_CHUNK_TOKENS, tokens)
    v = m.vocab_size
    loss = chunk * v * (4 + elt + (4 if elt == 2 else 0)) + v * d * (4 + elt) + 2 * tokens * d * elt + tokens * norm
    fsdp = 2 * elt * base.layer_params + elt * base.fixed_params  # gathered parameters
    fsdp += elt * base.fixed_params + (elt + 4) * base.layer_params  # unsharded gradients, reduce buffer
    fixed = loss + fsdp
    if tr.activation_checkpointing:
        fixed += full_layer
    accum = tr.global_batch_tokens // (m.seq_len * tr.micro_batch_size * ranks)
    return Costs(**{**base.__dict__, "ranks": ranks, "activation_layer_bytes": per_layer,
                    "activation_adapter_bytes": adapter, "activation_fixed_bytes": fixed,
                    "accumulated_grad_bytes": 4 if accum > 1 and not galore else 0})


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

    Everything else (embeddings, head, final norm, and the two RMSNorm weights inside each decoder
    layer) keeps ordinary AdamW state: two fp32 moments. Exact for fp32 training on one rank, where
    weight + gradient are the same 8 bytes per parameter (tests/test_galore_memory.py counts it).
    """
    m, r = spec.model, spec.step.galore_rank
    d, inter = m.hidden_size, m.intermediate_size
    kv = m.kv_dim
    if spec.memory.accounting == "paper":
        inter, kv = round(8 / 3 * d), d
    mats = [(d, d), (d, kv), (d, kv), (d, d), (d, inter), (d, inter), (inter, d)]
    projected = sum(2 * 4 * r * max(a, b) + 4 * min(a, b) * r for a, b in mats)  # moments r x max, projector min x r
    per_layer = 8 * costs.layer_params + 8 * 2 * d + projected  # + the layer norms' two fp32 moments
    return m.num_layers * per_layer + 16 * costs.fixed_params


def galore_stage_bytes(spec: Spec, costs: Costs) -> int:
    """GaLore's one stage (every layer trained, on one unsharded rank) under `costs`, the spec's accounting:
    its model states (galore_bytes) and, under "device" accounting, what a training step adds on top of
    exact model states (activations, buffers). One formula for the plan and for will-it-fit."""
    states = galore_bytes(spec, costs)
    if spec.memory.accounting != "device":
        return states
    layers = spec.model.num_layers
    return states + costs.stage_bytes(layers, 0) - exact_costs(spec).stage_bytes(layers, 0)
