"""The Llama-family decoder as Flax NNX modules: llama, mistral (sliding window), qwen2 (q/k/v bias), qwen3
(per-head q/k norm).

Pre-norm blocks `x += attn(rms(x)); x += mlp(rms(x))`, final RMSNorm, LM head tied to the embedding or not.
`CausalLM` holds what every architecture shares (embedding, final norm, LM head, the logits call, the inputs of
the layers); `Decoder` adds its stack of `DecoderLayer`s.

State (`nnx.state(model)`, every parameter in `config.param_dtype`; `nnx.to_pure_dict` gives these nested keys):
    embed.embedding [V, E]
    layers.{input_norm.scale [L,E], attn.* (see attention.py, with a leading L), post_attn_norm.scale [L,E],
            mlp.{gate_proj,up_proj}.kernel [L,E,F], mlp.down_proj.kernel [L,F,E]}
    final_norm.scale [E]
    lm_head.kernel [E, V]                 (absent when tie_embeddings)
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from longtrain.models import attention_site
from longtrain.models.attention import Attention
from longtrain.models.layer_stack import layer_function, run_layers, stack_layers
from longtrain.models.layers import MLP, Embed, Linear, RMSNorm, dtype_of, module_keys
from longtrain.models.rope import rope_cos_sin

FAMILY = ("llama", "mistral", "qwen2", "qwen3")


def check_config(config) -> None:
    if config.architecture not in FAMILY:
        raise ValueError(f"model.architecture={config.architecture!r} is not a Llama-family decoder {FAMILY}")
    if config.layer_types is not None:
        raise ValueError(f"model.layer_types={config.layer_types!r} is only for the minimax hybrid; "
                         f"architecture {config.architecture!r} has softmax attention in every layer")
    if config.num_experts != 1:
        raise ValueError(f"model.num_experts={config.num_experts} needs a mixture-of-experts architecture "
                         f"(minimax); {config.architecture!r} has a dense MLP")
    check_heads(config)


def check_heads(config) -> None:
    if config.num_heads % config.num_kv_heads:
        raise ValueError(f"model.num_heads={config.num_heads} is not a multiple of "
                         f"model.num_kv_heads={config.num_kv_heads} (GQA)")


@dataclasses.dataclass
class LayerInputs:
    """What every layer of one call sees besides the residual stream."""
    cos_sin: tuple                # rope_cos_sin(config, positions, dtype)
    segment_ids: Any              # [B, T] int or None (one document per row)
    token_index: Any              # [B, T] int32 global token indices
    runtime: Any                  # attention_site runtime (LocalRuntime or a context-parallel one)
    return_kv: bool               # also return each layer's chunk-wise cache


class CausalLM(nnx.Module):
    """Embedding, final norm and LM head around a stack of layers; subclasses define `hidden`."""

    # `hidden(kv_prefix=...)` also takes a `layer_stack.StackedCaches`: chunk-wise training then passes its stacked
    # K/V buffers without a per-step copy and gets their cotangent added in place (longtrain/chunkwise/engine.py)
    ACCEPTS_STACKED_CACHES = True

    def __init__(self, config, *, key):
        E = config.hidden_size
        k_embed, k_head = jax.random.split(key)
        self.config = config
        self.embed = Embed(config, key=k_embed)
        self.final_norm = RMSNorm((E,), ("embed",), config, config.rms_norm_eps)
        self.lm_head = (None if config.tie_embeddings else
                        Linear((E,), (config.vocab_size,), ("embed",), ("vocab",), config, key=k_head))

    def __call__(self, tokens_BT, *, positions=None, segment_ids=None, runtime=None):
        """Logits [B,T,V] in fp32. Materialises the full logits: for training use `longtrain.loss.lm_loss` on
        `hidden` and `lm_head_weight` instead."""
        hidden_BTE = self.hidden(tokens_BT, positions=positions, segment_ids=segment_ids, runtime=runtime)
        return jnp.einsum("bte,ev->btv", hidden_BTE.astype(jnp.float32), self.lm_head_weight().astype(jnp.float32))

    def hidden(self, tokens_BT, *, positions=None, segment_ids=None, runtime=None, token_index=None,
               kv_prefix=None, return_kv=False):
        """Final-norm hidden states [B,T,E] (and per-layer chunk-wise caches when `return_kv`)."""
        raise NotImplementedError

    def lm_head_weight(self):
        """[E, V]: the tied embedding transposed, or the untied LM head."""
        if self.lm_head is None:
            return self.embed.embedding[...].T
        return self.lm_head.kernel[...]

    def embed_inputs(self, tokens_BT, *, positions, segment_ids, runtime, token_index, kv_prefix, return_kv):
        """-> (embedded tokens x [B,T,E], LayerInputs), after the checks every architecture makes."""
        config = self.config
        if (kv_prefix is not None or return_kv) and config.rope_scaling.type == "dynamic":
            raise ValueError("rope_scaling.type='dynamic' depends on the longest position of the whole batch, so "
                             "chunk-wise runs (kv_prefix/return_kv) would use different frequencies per chunk; use "
                             "linear, yarn or llama3 scaling for chunk-wise training")
        runtime = attention_site.resolve_runtime(config, runtime)
        if kv_prefix is not None or return_kv:
            attention_site.require_local(runtime, "kv_prefix/return_kv (chunk-wise caches)")
        B, T = tokens_BT.shape
        if token_index is None:  # one document per row unless positions say otherwise
            token_index = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        token_index = token_index.astype(jnp.int32)
        positions = token_index if positions is None else positions.astype(jnp.int32)
        x_BTE = self.embed.lookup(attention_site.embedding_table(runtime, self.embed.embedding[...]), tokens_BT)
        x_BTE = runtime.constrain(x_BTE, ("batch", "seq", "embed"))
        cos_sin = rope_cos_sin(config, positions, dtype_of(config.dtype))
        return x_BTE, LayerInputs(cos_sin, segment_ids, token_index, runtime, return_kv)


class DecoderLayer(nnx.Module):
    def __init__(self, config, *, key):
        E, eps = config.hidden_size, config.rms_norm_eps
        k_attn, k_mlp = jax.random.split(key)
        self.sliding_window = config.sliding_window
        self.input_norm = RMSNorm((E,), ("embed",), config, eps)
        self.attn = Attention(config, key=k_attn)
        self.post_attn_norm = RMSNorm((E,), ("embed",), config, eps)
        self.mlp = MLP(config, key=k_mlp)

    def __call__(self, x_BTE, inputs: LayerInputs, prefix_kv=None):
        """-> (x [B,T,E], this layer's chunk-wise cache or None)."""
        attn = self.attn(self.input_norm(x_BTE), cos_sin=inputs.cos_sin, segment_ids=inputs.segment_ids,
                         token_index=inputs.token_index, runtime=inputs.runtime, prefix_kv=prefix_kv,
                         return_kv=inputs.return_kv, sliding_window=self.sliding_window)
        attn_BTE, kv = attn if inputs.return_kv else (attn, None)
        x_BTE = x_BTE + attn_BTE
        x_BTE = x_BTE + self.mlp(self.post_attn_norm(x_BTE), inputs.runtime)
        return inputs.runtime.constrain(x_BTE, ("batch", "seq", "embed")), kv


class Decoder(CausalLM):
    """A Llama-family model: `Decoder(config, rngs=nnx.Rngs(0))(tokens) -> logits` (or `key=` a PRNG key)."""

    def __init__(self, config, *, rngs: nnx.Rngs | None = None, key=None):
        check_config(config)
        k_outer, k_layers = module_keys(rngs, key, 2)
        super().__init__(config, key=k_outer)
        self.layers = stack_layers(lambda k: DecoderLayer(config, key=k), config.num_layers, k_layers)

    def hidden(self, tokens_BT, *, positions=None, segment_ids=None, runtime=None, token_index=None,
               kv_prefix=None, return_kv=False):
        """tokens [B,T] -> final-norm hidden states [B,T,E] (and per-layer kv caches when `return_kv`).
        `kv_prefix`: None, one cache per layer, or a `layer_stack.StackedCaches` (chunk-wise training passes its
        stacked K/V buffers without a per-step copy and gets their cotangent added in place)."""
        x_BTE, inputs = self.embed_inputs(tokens_BT, positions=positions, segment_ids=segment_ids,
                                          runtime=runtime, token_index=token_index, kv_prefix=kv_prefix,
                                          return_kv=return_kv)
        state, layer = layer_function(self.layers, lambda module, x, prefix_l: module(x, inputs, prefix_l),
                                      inputs.runtime)
        x_BTE, kvs = run_layers(layer, state, x_BTE, scan=self.config.scan_layers, remat_policy=self.config.remat,
                                kv_prefix=kv_prefix, return_kv=return_kv)
        hidden_BTE = self.final_norm(x_BTE)
        return (hidden_BTE, kvs) if return_kv else hidden_BTE
