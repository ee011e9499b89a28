"""Layer growth (STEP Procedure 2) for ``transformers.LlamaForCausalLM``.

STEP grows a trained model by inserting new decoder layers between existing ones
(the *Interpolation* growth operator, paper section 3.1 and Appendix C):

* ``interpolation-copy``: a new layer placed after old layer ``j`` is a copy of
  ``phi_j`` (its lower neighbour), as in most prior work;
* ``interpolation-mean``: it is ``(phi_j + phi_{j+1}) / 2`` (bert2BERT-style
  fusing of both neighbours, the paper's default).

Beyond the paper, two *stacking* operators copy whole blocks of layers instead of
filling gaps (their placement is defined exactly in :func:`stack_plan`):

* ``stack`` (G_stack, Du et al. 2024, "Stacking your transformers"): the new layers
  are copies of the top block of the current model, placed above it; when ``n_i``
  equals the current depth this is G_stack's whole-model stack;
* ``stack-middle`` (MIDAS, Saunshi et al. 2024): copies of the middle block, inserted
  directly above that block.

Optionally the new layers get *function preserving initialisation* (FPI): the
output projections of their attention and MLP blocks are zeroed, so each new
layer adds exactly zero to the residual stream and the grown model computes the
same logits as before growth. LLaMA-Pro's block expansion (Wu et al. 2024) is the
recipe ``interpolation-copy`` + ``fpi`` + position ``spread``: one zero-output copy
of the last layer of each of ``n_i`` equal groups, placed after that group.

No library does this for Hugging Face models, and inserting modules into
``model.model.layers`` is not enough on its own: transformers keeps per-layer
bookkeeping that must be updated too (see :func:`_sync_transformers_metadata`),
otherwise new layers silently never run or KV-cache decoding silently mixes up
the caches of different layers.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass

import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

__all__ = ["OPERATORS", "POSITIONS", "STACK_OPERATORS", "LayerSource", "grow_layers", "layer_sources", "plan_insertion",
           "stack_plan"]

#: Where new layers go (paper Figure 3 / Table 4; "upper" performed best). "spread" spaces them
#: evenly through the stack, as LLaMA-Pro's block expansion does.
POSITIONS: tuple[str, ...] = ("upper", "lower", "intermediate", "random", "spread")
#: Operators that copy a contiguous block and place it themselves (``position`` does not apply).
STACK_OPERATORS: tuple[str, ...] = ("stack", "stack-middle")
#: Growth operators (paper Appendix C / Table 9, plus G_stack and MIDAS stacking).
OPERATORS: tuple[str, ...] = ("interpolation-mean", "interpolation-copy", *STACK_OPERATORS)


def _choose_gaps(num_old: int, count: int, position: str, rng: random.Random) -> list[int]:
    """Pick ``count`` *distinct* gaps (``count <= num_old``) according to ``position``.

    Gap ``j`` means "directly after old layer ``j``".
    """
    if count == 0:
        return []
    if position == "upper":
        return list(range(num_old - count, num_old))
    if position == "lower":
        return list(range(count))
    if position == "intermediate":
        # A contiguous block whose centre is the middle of the stack; when the
        # leftover space is odd the extra gap goes above the block, i.e. the block
        # leans towards the lower half (floor division) -- any fixed rule works as
        # long as it is deterministic.
        start = (num_old - count) // 2
        return list(range(start, start + count))
    if position == "random":
        return sorted(rng.sample(range(num_old), count))
    if position == "spread":
        # LLaMA-Pro: split the stack into `count` groups of (nearly) equal size and put one new
        # layer after the last layer of each group, the top one included. count <= num_old makes
        # consecutive values differ by >= 1, so the gaps are distinct.
        return [(k + 1) * num_old // count - 1 for k in range(count)]
    raise ValueError(f"unknown position {position!r}; expected one of {POSITIONS}")


def plan_insertion(num_old: int, num_new: int, position: str, seed: int) -> list[int]:
    """Decide where new layers are inserted.

    Args:
        num_old: number of layers of the model before growth (>= 1).
        num_new: number of layers to insert (>= 0).
        position: ``"upper"``, ``"lower"``, ``"intermediate"``, ``"random"`` or ``"spread"``.
        seed: seed of the ``random.Random`` used by ``"random"`` (ignored otherwise,
            but it is always required so that plans are reproducible from the spec).

    Returns:
        For each new layer, the index ``j`` of the old layer it is inserted directly
        after, sorted ascending (a gap index may repeat when several new layers share
        a gap).

    When ``num_new > num_old`` there are not enough gaps for one layer each, so every
    gap receives ``num_new // num_old`` layers (full "rounds") and the remaining
    ``num_new % num_old`` layers go to distinct gaps chosen by ``position``. Every gap
    therefore gets either the floor or the ceiling of ``num_new / num_old`` layers and
    the result is deterministic for a given seed.

    Raises:
        ValueError: on a non-positive ``num_old``, negative ``num_new`` or unknown position.
    """
    if isinstance(num_old, bool) or not isinstance(num_old, int) or num_old < 1:
        raise ValueError(f"num_old must be an int >= 1, got {num_old!r}")
    if isinstance(num_new, bool) or not isinstance(num_new, int) or num_new < 0:
        raise ValueError(f"num_new must be an int >= 0, got {num_new!r}")
    if position not in POSITIONS:
        raise ValueError(f"unknown position {position!r}; expected one of {POSITIONS}")

    rng = random.Random(seed)
    full_rounds, remainder = divmod(num_new, num_old)
    gaps = [j for j in range(num_old) for _ in range(full_rounds)]
    gaps += _choose_gaps(num_old, remainder, position, rng)
    return sorted(gaps)


def stack_plan(num_old: int, num_new: int, operator: str, block: int | None = None) -> tuple[int, list[int]]:
    """Placement of the stacking operators: ``(gap, sources)``.

    The ``num_new`` new layers are inserted as one contiguous run directly after old layer
    ``gap``; new layer ``k`` (bottom to top) is a copy of old layer ``sources[k]``.

    The copied block has ``b = block`` layers, or ``b = min(num_new, num_old)`` when ``block`` is
    None, and is repeated (bottom to top, the last repetition cut short) until ``num_new`` layers
    exist: ``sources[k] = start + k % b``.

    * ``"stack"`` (G_stack): the block is the top ``b`` layers, ``start = num_old - b``, and
      the run goes above the top layer (``gap = num_old - 1``). With ``num_new == num_old``
      the grown model is the old model twice over (G_stack's whole-model stack); with
      ``num_new = (g - 1) * num_old`` it is stacked ``g`` times.
    * ``"stack-middle"`` (MIDAS): the block is the middle ``b`` layers,
      ``start = (num_old - b) // 2`` (an odd leftover puts the extra layer above the block),
      and the run goes directly above the block (``gap = start + b - 1``), so the copies sit
      next to their originals in the middle of the stack. With ``b == num_old`` it equals
      ``"stack"``.

    Raises:
        ValueError: on an unknown operator, ``num_old < 1``, ``num_new < 0``, or a block that
            does not fit (``block < 1`` or ``block > num_old``).
    """
    if operator not in STACK_OPERATORS:
        raise ValueError(f"unknown stacking operator {operator!r}; expected one of {STACK_OPERATORS}")
    if isinstance(num_old, bool) or not isinstance(num_old, int) or num_old < 1:
        raise ValueError(f"num_old must be an int >= 1, got {num_old!r}")
    if isinstance(num_new, bool) or not isinstance(num_new, int) or num_new < 0:
        raise ValueError(f"num_new must be an int >= 0, got {num_new!r}")
    size = min(num_new, num_old) if block is None else block
    if block is not None and not 1 <= block <= num_old:
        raise ValueError(f"a block of {block} layers does not fit a {num_old}-layer model")
    if num_new == 0:
        return num_old - 1, []
    start = num_old - size if operator == "stack" else (num_old - size) // 2
    gap = num_old - 1 if operator == "stack" else start + size - 1
    return gap, [start + k % size for k in range(num_new)]


@dataclass(frozen=True)
class LayerSource:
    """Where one layer of the grown model comes from.

    ``new = False``: old layer ``parents[0]``, kept. ``new = True``: a new layer initialised from the
    old layers ``parents`` (one: a copy; two: their element-wise mean). ``after`` is the old layer it
    is inserted after, which also gives its transformers layer type.
    """

    new: bool
    parents: tuple[int, ...]
    after: int


def layer_sources(num_old: int, num_new: int, operator: str, position: str, seed: int,
                  block: int | None = None) -> list[LayerSource]:
    """The grown model, layer by layer (bottom to top): the one map of a growth that the eager
    path (:func:`grow_layers`) and the sharded meta-device path (runtime/model/materialise.py) both follow."""
    if operator not in OPERATORS:
        raise ValueError(f"unknown operator {operator!r}; expected one of {OPERATORS}")
    if operator in STACK_OPERATORS:
        stack_gap, stack_sources = stack_plan(num_old, num_new, operator, block)
        per_gap = Counter({stack_gap: num_new})
    else:
        per_gap = Counter(plan_insertion(num_old, num_new, position, seed))
    out: list[LayerSource] = []
    for j in range(num_old):
        out.append(LayerSource(False, (j,), j))
        for k in range(per_gap[j]):
            if operator in STACK_OPERATORS:
                parents: tuple[int, ...] = (stack_sources[k],)
            elif operator == "interpolation-mean" and j + 1 < num_old:
                parents = (j, j + 1)
            else:  # a copy of the lower neighbour (mean at the top gap falls back to it: no upper one)
                parents = (j,)
            out.append(LayerSource(True, parents, j))
    return out


def _source_state_dict(layers: nn.ModuleList, parents: tuple[int, ...]) -> dict[str, torch.Tensor]:
    """State dict that initialises a new layer: a copy of one parent, or the mean of two."""
    lower = layers[parents[0]].state_dict()
    if len(parents) == 1:
        return dict(lower)  # views of the old weights; the caller clones them for each new layer
    upper = layers[parents[1]].state_dict()
    # Average every tensor, norms included. Accumulate in fp32 (or better) so a bf16
    # model does not lose a bit in the sum before the halving.
    out: dict[str, torch.Tensor] = {}
    for k, v in lower.items():
        acc_dtype = torch.promote_types(v.dtype, torch.float32) if v.is_floating_point() else v.dtype
        mean = (v.detach().to(acc_dtype) + upper[k].detach().to(acc_dtype)) / 2
        out[k] = mean.to(v.dtype)
    return out


def _build_layer(
    config: LlamaConfig, layer_idx: int, state: dict[str, torch.Tensor], like: nn.Module
) -> LlamaDecoderLayer:
    """Build a ``LlamaDecoderLayer`` holding ``state`` on ``like``'s device/dtypes.

    The layer is created on the meta device (no wasted random init, no allocation on
    the wrong device) and its tensors are then *assigned* from ``state``, whose tensors
    already carry the source layer's per-tensor device and dtype (so a model with, say,
    fp32 norms and bf16 linears keeps that mix).
    """
    with torch.device("meta"):
        layer = LlamaDecoderLayer(config, layer_idx)
    layer.load_state_dict(state, strict=True, assign=True)
    for name, t in list(layer.named_parameters()) + list(layer.named_buffers()):
        if t.is_meta:  # a non-persistent buffer would not be in the state dict
            raise RuntimeError(f"new layer tensor {name!r} was not initialised")
    # assign=True keeps the module's requires_grad (True): new layers are trainable.
    layer.train(like.training)
    return layer


def _zero_output_projections(layer: LlamaDecoderLayer) -> None:
    """FPI: make ``layer`` the identity on the residual stream.

    Each block computes ``h + out_proj(...)``; with the output projection (and its
    bias) zero the block adds exactly ``0`` and ``h`` passes through bit-for-bit.
    """
    with torch.no_grad():
        for proj in (layer.self_attn.o_proj, layer.mlp.down_proj):
            proj.weight.zero_()
            if proj.bias is not None:
                proj.bias.zero_()


def _sync_transformers_metadata(
    model: LlamaForCausalLM, sources: list[int], layer_types_old: list[str] | None
) -> None:
    """Make transformers' per-layer bookkeeping match the new layer list.

    * ``LlamaModel.forward`` iterates ``self.layers[: config.num_hidden_layers]``: a
      stale count silently skips the top layers.
    * Each attention writes into the KV cache slot ``self_attn.layer_idx``: stale
      indices make two layers share (and corrupt) one cache slot, so cached decoding
      differs from a full forward while a plain forward still looks right.
    * ``config.layer_types`` (when set) sizes the cache per layer.

    ``sources[i]`` is the old index of layer ``i`` (for a new layer: the old layer
    whose type it inherits: the one it was inserted after, or the one it copies when stacking).
    """
    layers = model.model.layers
    for i, layer in enumerate(layers):
        layer.self_attn.layer_idx = i
    config = model.config
    config.num_hidden_layers = len(layers)
    if layer_types_old is not None:
        config.layer_types = [layer_types_old[s] for s in sources]


def grow_layers(
    model: LlamaForCausalLM,
    num_new: int,
    operator: str,
    position: str,
    fpi: bool,
    seed: int,
    block: int | None = None,
) -> list[int]:
    """Insert ``num_new`` decoder layers into ``model`` in place.

    Args:
        model: an *unsharded* ``LlamaForCausalLM`` (grow before ``fully_shard``).
        num_new: number of layers to add.
        operator: ``"interpolation-mean"``, ``"interpolation-copy"``, ``"stack"`` or
            ``"stack-middle"``.
        position: see :func:`plan_insertion` (ignored by the stacking operators, which place
            their copies themselves: :func:`stack_plan`).
        fpi: zero the new layers' ``o_proj``/``down_proj`` so logits are unchanged.
        seed: seed for ``position="random"``.
        block: stacking operators only: size of the copied block (see :func:`stack_plan`).

    Returns:
        The indices, in the grown model, of the new layers (ascending).

    Interpolation: every new layer placed in the same gap gets the same initialisation. The new
    layers live on the same device(s)/dtype(s) as their source layers and are
    trainable; old layers are left untouched (freezing them is the caller's job).
    """
    if operator not in OPERATORS:
        raise ValueError(f"unknown operator {operator!r}; expected one of {OPERATORS}")
    config = model.config
    if getattr(config, "is_heterogeneous", False):
        # Per-layer config overrides are keyed by layer index and would need remapping.
        raise NotImplementedError("growth of models with per_layer_config overrides is not supported")
    old_layers = model.model.layers
    num_old = len(old_layers)
    if num_old != config.num_hidden_layers:
        raise ValueError(
            f"model has {num_old} layers but config.num_hidden_layers={config.num_hidden_layers}"
        )
    layer_types_old = getattr(config, "layer_types", None)
    if layer_types_old is not None:
        layer_types_old = list(layer_types_old)
    new_list: list[nn.Module] = []
    sources: list[int] = []
    new_indices: list[int] = []
    shared: dict[tuple[int, ...], dict[str, torch.Tensor]] = {}
    for src in layer_sources(num_old, num_new, operator, position, seed, block):
        if not src.new:
            new_list.append(old_layers[src.parents[0]])
            sources.append(src.parents[0])
            continue
        if src.parents not in shared:  # interpolation: every new layer of one gap gets the same init
            shared[src.parents] = _source_state_dict(old_layers, src.parents)
        # Clone so every new layer owns its storage (assign=True would alias it).
        fresh = {name: v.clone() for name, v in shared[src.parents].items()}
        like = old_layers[src.parents[0]]
        layer = _build_layer(config, len(new_list), fresh, like=like)
        if fpi:
            _zero_output_projections(layer)
        new_indices.append(len(new_list))
        new_list.append(layer)
        # the new layer inherits the layer type of its source (stacking) or of the layer it follows
        sources.append(src.parents[0] if operator in STACK_OPERATORS else src.after)

    model.model.layers = nn.ModuleList(new_list)
    _sync_transformers_metadata(model, sources, layer_types_old)
    return new_indices
