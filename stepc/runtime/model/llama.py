"""The stage's LlamaForCausalLM (StepcLlama: the same weights and keys, a leaner training loss).

The runtime builds it on the meta device and fills each rank's shard after FSDP sharding
(stepc.runtime.model.materialise); tests/eager_reference.py builds the whole model eagerly on the
CPU, the reference that construction is tested against bit for bit.
"""

from __future__ import annotations

import functools
import torch
from torch.utils.checkpoint import checkpoint
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.modeling_outputs import CausalLMOutputWithPast

from stepc.runtime.loop.loss import linear_cross_entropy
from stepc.schema.spec import Model


def llama_config(model: Model, num_layers: int) -> LlamaConfig:
    """A LlamaConfig from the manifest's normalised [model] table (never downloaded)."""
    return LlamaConfig(
        vocab_size=model.embedding_rows, hidden_size=model.hidden_size, intermediate_size=model.intermediate_size,
        num_hidden_layers=num_layers, num_attention_heads=model.num_attention_heads,
        num_key_value_heads=model.num_key_value_heads, max_position_embeddings=model.seq_len,
        tie_word_embeddings=model.tie_embeddings, attention_bias=False, mlp_bias=False,
        bos_token_id=None, eos_token_id=None, pad_token_id=None, attn_implementation="sdpa",
    )


class StepcLlama(LlamaForCausalLM):
    """LlamaForCausalLM whose loss never materialises the micro-batch's logits, and no KV cache.

    With labels, forward returns only the loss (logits=None): the decoder's last hidden states go
    through stepc.runtime.loop.loss.linear_cross_entropy, chunk by chunk. Without labels it is
    LlamaForCausalLM's forward. Training never needs a KV cache (use_cache=False): the cache's
    K/V concatenations would only keep activations alive into the next micro-batch.
    """

    def forward(self, input_ids=None, labels=None, **kwargs):
        if labels is None:
            return super().forward(input_ids=input_ids, **kwargs)
        return CausalLMOutputWithPast(loss=linear_cross_entropy(self.hidden_states(input_ids), self.lm_head.weight, labels))

    def hidden_states(self, input_ids: torch.Tensor) -> torch.Tensor:
        """LlamaModel.forward for training blocks: plain causal attention (SDPA's is_causal, no mask
        tensor, so flash attention applies), no cache. transformers' own mask builder reads the
        position ids back to the host to look for packed sequences: a GPU sync in every forward."""
        m = self.model
        hidden = m.embed_tokens(input_ids)
        position_ids = torch.arange(input_ids.shape[1], device=hidden.device)[None]
        position_embeddings = m.rotary_emb(hidden, position_ids=position_ids)
        for layer in m.layers[: self.config.num_hidden_layers]:
            hidden = layer(hidden, attention_mask=None, position_embeddings=position_embeddings, position_ids=position_ids)
        return m.norm(hidden)


def wrap_decoder_layers(model: StepcLlama, compile_: bool, checkpointing: bool) -> None:
    """[train] compile and activation_checkpointing, applied to each decoder layer's `forward` on the
    (meta) model before FSDP2 shards it: checkpoint( compile( forward ) ).

    Only `forward` is wrapped, never the module's call: FSDP2's all-gather/reshard hooks and any
    other module hook stay outside both the compiled region (a hook inside it breaks the graph at
    every layer, so the compile is `fullgraph=True`: a break is an error, not a silent slowdown) and
    the checkpointed region (a hook inside it would run again when backward recomputes the layer).
    The layers share one compiled graph (same code, same shapes). Checkpointing sits outside the
    compiled forward, not inside it as torchtitan nests them: tracing through checkpoint's
    higher-order op fails on the context variable transformers' kernel hub sets in every attention
    call ("HOP: Unsafe side effect"), and the recomputation then simply reruns the compiled kernels.
    stepc checkpoints with torch itself rather than transformers' gradient_checkpointing_enable,
    whose mechanism differs between transformers releases.
    """
    if not (compile_ or checkpointing):
        return
    for layer in model.model.layers:
        forward = layer.forward
        if compile_:
            forward = torch.compile(forward, fullgraph=True)
        if checkpointing:
            forward = functools.partial(_checkpointed, forward)
        layer.forward = forward


def _checkpointed(forward, *args, **kwargs):
    return checkpoint(forward, *args, use_reentrant=False, **kwargs)


def runtime_config(model: Model, num_layers: int) -> LlamaConfig:
    config = llama_config(model, num_layers)
    config.use_cache = False
    return config
