"""The memory model: bytes of model states per stage as a linear function of the stage layout.

A stage that adds `new` layers on top of `old` frozen ones holds
    TRAINED bytes x (new * P_layer + old * E + fixed)  +  FROZEN bytes x old * P_layer  (+ step scalars)
which is Eq. 2 of the paper when P_layer = 12 d^2 + 2 d (Eq. 4), E = 19 r d (Eq. 5), fixed = 0,
16 bytes per trained and 2 per frozen parameter. "exact" counts the real LlamaForCausalLM instead.
"""

from __future__ import annotations

from dataclasses import dataclass

from stepc.schema.shapes import LINEAR_MAPS, LOSS_CHUNK_TOKENS, adapter_params, fixed_params, layer_params, linear_shapes
from stepc.schema.spec import Spec

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
    activation_adapter_bytes: int = 0  # "device": extra activations of one frozen layer's adapters
    accumulated_grad_bytes: int = 0  # "device": per trainable parameter, unsharded, under gradient accumulation
    fixed_terms: tuple[tuple[str, int], ...] = ()  # "device": named per-rank buffers (loss, FSDP2, a recomputed layer)

    @property
    def activation_fixed_bytes(self) -> int:
        """The per-rank buffers that do not scale with the layers (loss, FSDP2, a recomputed layer)."""
        return sum(value for _, value in self.fixed_terms)

    def terms(self, new: int, old: int) -> list[tuple[str, int]]:
        """Bytes of a stage that trains `new` layers above `old` frozen, adapted layers (per rank if
        ranks > 1), term by term: what `stepc plan --gpu --explain` prints; their sum is stage_bytes."""
        trained = new * self.layer_params + old * self.adapter_params + self.fixed_params
        tensors = new * self.layer_tensors + old * self.adapter_tensors + self.fixed_tensors
        frozen = self.frozen_bytes * old * self.layer_params
        per = f" (1/{self.ranks})" if self.ranks > 1 else ""
        states = -(-(TRAINED_BYTES * trained + frozen) // self.ranks)  # one ceiling for all sharded states
        weights, grads = 4 * trained // self.ranks, 4 * trained // self.ranks
        out = [(f"trained weights, fp32 master{per}", weights), (f"their gradients{per}", grads),
               (f"AdamW moments{per}", states - weights - grads - frozen // self.ranks),
               (f"frozen weights, {self.frozen_bytes} bytes each{per}", frozen // self.ranks),
               ("AdamW step scalars (every rank holds one per tensor)", self.step_bytes * tensors),
               ("unsharded fp32 gradients kept between micro-batches", self.accumulated_grad_bytes * trained),
               (f"activations of {new + old} decoder layers", (new + old) * self.activation_layer_bytes),
               (f"adapter activations of {old} frozen layers", old * self.activation_adapter_bytes),
               *self.fixed_terms]
        return [(name, value) for name, value in out if value]

    def stage_bytes(self, new: int, old: int) -> int:
        """Bytes of a stage that trains `new` layers above `old` frozen, adapted layers (per rank if ranks > 1)."""
        return sum(value for _, value in self.terms(new, old))

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
    return layer_params(m), adapter_params(m, spec.step.lora_rank), fixed_params(m)


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
    """Per-GPU peak estimate: exact model states sharded over the ranks (over one node's ranks under
    [launch] sharding = "hybrid": HSDP keeps one copy per node), plus what a training step adds on
    top of them at its peak (the start of the backward pass), per rank.

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
    galore = not spec.method.shards  # one unsharded rank (GaLore)
    ranks = 1 if galore else la.nnodes * la.nproc_per_node
    shards = la.nproc_per_node if la.sharding == "hybrid" else ranks  # HSDP: one copy per node
    elt = 2 if tr.precision == "bf16" else 4
    d, inter, kv, heads = m.hidden_size, m.intermediate_size, m.kv_dim, m.num_attention_heads
    tokens = tr.micro_batch_size * m.seq_len
    norm = 4 * d + 4 + 2 * elt * d
    full_layer = tokens * (2 * norm + elt * (2 * d + 2 * kv + 4 * inter) + 4 * heads)
    per_layer = tokens * elt * d if tr.activation_checkpointing else full_layer
    adapter = 0 if tr.activation_checkpointing else tokens * len(LINEAR_MAPS) * spec.step.lora_rank * elt
    chunk = min(LOSS_CHUNK_TOKENS, tokens)
    v = m.embedding_rows
    loss = chunk * v * (4 + elt + (4 if elt == 2 else 0)) + v * d * (4 + elt) + 2 * tokens * d * elt + tokens * norm
    gathered = 2 * elt * base.layer_params + elt * base.fixed_params
    unsharded = elt * base.fixed_params + (elt + 4) * base.layer_params  # gradients and the reduce buffer
    fixed = [("LM-head loss: chunk logits, head gradient, hidden-state gradient", loss),
             ("FSDP2 all-gathered parameters (root, current and next layer)", gathered),
             ("FSDP2 unsharded gradients and reduce-scatter buffer", unsharded)]
    if tr.activation_checkpointing:
        fixed.append(("one layer recomputed in full (activation checkpointing)", full_layer))
    accum = tr.global_batch_tokens // (m.seq_len * tr.micro_batch_size * ranks)
    return Costs(**{**base.__dict__, "ranks": 1 if galore else shards, "activation_layer_bytes": per_layer,
                    "activation_adapter_bytes": adapter, "fixed_terms": tuple(fixed),
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
    m, r, d = spec.model, spec.step.galore_rank, spec.model.hidden_size
    if spec.memory.accounting == "paper":  # Eq. 4's layer: no GQA, width 8/3 d
        m = m.model_copy(update={"intermediate_size": round(8 / 3 * d), "num_key_value_heads": m.num_attention_heads})
    mats = list(linear_shapes(m).values())
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
