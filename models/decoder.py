"""The Llama-family decoder: llama, mistral (sliding window), qwen2 (q/k/v bias), qwen3 (per-head q/k norm).

Pre-norm blocks `x += attn(rms(x)); x += mlp(rms(x))`, final RMSNorm, LM head tied to the embedding or not.

Params (plain nested dicts; every leaf in `config.param_dtype`):
    embed.embedding [V, E]
    layers.{input_norm.scale [L,E], attn.* (see attention.py, with a leading L), post_attn_norm.scale [L,E],
            mlp.{gate_proj,up_proj}.kernel [L,E,F], mlp.down_proj.kernel [L,F,E]}
    final_norm.scale [E]
    lm_head.kernel [E, V]                 (absent when tie_embeddings)
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from longtrain.models import attention_site
from longtrain.models.attention import apply_attention, attention_logical_axes, init_attention
from longtrain.models.layer_stack import run_layers
from longtrain.models.layers import (apply_mlp, dtype_of, embed, init_mlp, mlp_logical_axes, normal_init, ones,
                                     rms_norm)
from longtrain.models.rope import rope_cos_sin

FAMILY = ("llama", "mistral", "qwen2", "qwen3")
# `forward_hidden(kv_prefix=...)` also takes a `layer_stack.StackedCaches` (run_layers handles it): chunk-wise
# training passes its stacked K/V buffers without a per-step copy and gets their cotangent added in place.
ACCEPTS_STACKED_CACHES = True


def check_config(config) -> None:
    if config.architecture not in FAMILY:
        raise ValueError(f"model.architecture={config.architecture!r} is not a Llama-family decoder {FAMILY}")
    if config.layer_types is not None:
        raise ValueError(f"model.layer_types={config.layer_types!r} is only for the minimax hybrid; "
                         f"architecture {config.architecture!r} has softmax attention in every layer")
    if config.num_experts != 1:
        raise ValueError(f"model.num_experts={config.num_experts} needs a mixture-of-experts architecture "
                         f"(minimax); {config.architecture!r} has a dense MLP")
    if config.num_heads % config.num_kv_heads:
        raise ValueError(f"model.num_heads={config.num_heads} is not a multiple of "
                         f"model.num_kv_heads={config.num_kv_heads} (GQA)")


# --------------------------------------------------------------------------------------------------- params
def init_layer(config, rng) -> dict:
    r_attn, r_mlp = jax.random.split(rng)
    E, pdt = config.hidden_size, config.param_dtype
    return {
        "input_norm": {"scale": ones((E,), pdt)},
        "attn": init_attention(config, r_attn),
        "post_attn_norm": {"scale": ones((E,), pdt)},
        "mlp": init_mlp(config, r_mlp),
    }


def init_embed_and_head(config, rng) -> dict:
    """`embed`, `final_norm` and (untied) `lm_head` params: shared by every decoder architecture."""
    r_embed, r_head = jax.random.split(rng)
    V, E, std, pdt = config.vocab_size, config.hidden_size, config.init_std, config.param_dtype
    params = {"embed": {"embedding": normal_init(r_embed, (V, E), std, pdt)},
              "final_norm": {"scale": ones((E,), pdt)}}
    if not config.tie_embeddings:
        params["lm_head"] = {"kernel": normal_init(r_head, (E, V), std, pdt)}
    return params


def embed_and_head_logical_axes(config) -> dict:
    axes = {"embed": {"embedding": ("vocab", "embed")}, "final_norm": {"scale": ("embed",)}}
    if not config.tie_embeddings:
        axes["lm_head"] = {"kernel": ("embed", "vocab")}
    return axes


def init(config, rng) -> dict:
    check_config(config)
    r_outer, r_layers = jax.random.split(rng)
    params = init_embed_and_head(config, r_outer)
    params["layers"] = jax.vmap(lambda r: init_layer(config, r))(jax.random.split(r_layers, config.num_layers))
    return params


def layer_logical_axes(config) -> dict:
    return {"input_norm": {"scale": ("embed",)}, "attn": attention_logical_axes(config),
            "post_attn_norm": {"scale": ("embed",)}, "mlp": mlp_logical_axes(config)}


def param_logical_axes(config) -> dict:
    axes = embed_and_head_logical_axes(config)
    axes["layers"] = jax.tree.map(lambda names: ("layers", *names), layer_logical_axes(config),
                                  is_leaf=lambda t: isinstance(t, tuple))
    return axes


# -------------------------------------------------------------------------------------------------- forward
def default_indices(tokens_BT, positions, token_index):
    """token_index defaults to arange(T) per row; positions default to token_index (one document per row)."""
    B, T = tokens_BT.shape
    if token_index is None:
        token_index = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    token_index = token_index.astype(jnp.int32)
    positions = token_index if positions is None else positions.astype(jnp.int32)
    return positions, token_index


def check_prefix_rope(config, kv_prefix, return_kv):
    if (kv_prefix is not None or return_kv) and config.rope_scaling.type == "dynamic":
        raise ValueError("rope_scaling.type='dynamic' depends on the longest position of the whole batch, so "
                         "chunk-wise runs (kv_prefix/return_kv) would use different frequencies per chunk; use "
                         "linear, yarn or llama3 scaling for chunk-wise training")


def forward_hidden(config, params, tokens, *, positions=None, segment_ids=None, runtime=None, token_index=None,
                   kv_prefix=None, return_kv=False):
    """tokens [B,T] -> final-norm hidden states [B,T,E] (and per-layer kv caches when `return_kv`)."""
    check_config(config)
    check_prefix_rope(config, kv_prefix, return_kv)
    runtime = attention_site.resolve_runtime(config, runtime)
    if kv_prefix is not None or return_kv:
        attention_site.require_local(runtime, "kv_prefix/return_kv (chunk-wise caches)")
    positions, token_index = default_indices(tokens, positions, token_index)
    cdt = dtype_of(config.dtype)
    x_BTE = embed(attention_site.embedding_table(runtime, params), tokens, dtype=config.dtype)
    x_BTE = runtime.constrain(x_BTE, ("batch", "seq", "embed"))
    cos_sin = rope_cos_sin(config, positions, cdt)
    eps = config.rms_norm_eps

    def layer(x_BTE, p, prefix_l):
        h_BTE = rms_norm(x_BTE, p["input_norm"]["scale"], eps)
        attn = apply_attention(config, p["attn"], h_BTE, cos_sin=cos_sin, segment_ids=segment_ids,
                               token_index=token_index, runtime=runtime, prefix_kv=prefix_l, return_kv=return_kv,
                               sliding_window=config.sliding_window)
        attn_BTE, kv = attn if return_kv else (attn, None)
        x_BTE = x_BTE + attn_BTE
        x_BTE = x_BTE + apply_mlp(config, p["mlp"], rms_norm(x_BTE, p["post_attn_norm"]["scale"], eps), runtime)
        return runtime.constrain(x_BTE, ("batch", "seq", "embed")), kv

    x_BTE, kvs = run_layers(layer, params["layers"], x_BTE, scan=config.scan_layers, remat_policy=config.remat,
                            kv_prefix=kv_prefix, return_kv=return_kv)
    hidden_BTE = rms_norm(x_BTE, params["final_norm"]["scale"], eps)
    return (hidden_BTE, kvs) if return_kv else hidden_BTE


def lm_head_weight(config, params):
    """[E, V]: the tied embedding transposed, or the untied LM head."""
    if config.tie_embeddings:
        return params["embed"]["embedding"].T
    return params["lm_head"]["kernel"]
