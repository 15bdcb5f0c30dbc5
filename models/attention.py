"""The softmax attention layer of every decoder (and of the softmax layers of the MiniMax hybrid).

q/k/v projections (optional bias: `attention_bias`), optional per-head RMSNorm on q and k (`qk_norm`, Qwen3), RoPE
on the first `rotary_dim` channels, GQA, optional sliding window, output projection (optional bias:
`attention_out_bias`). The attention itself goes through `attention_site.softmax_attention`.

Params (one layer): `q_proj.kernel [E, Hq, D]`, `k_proj/v_proj.kernel [E, Hkv, D]`, biases `[H, D]`,
`o_proj.kernel [Hq, D, E]`, `o_proj.bias [E]`, `q_norm.scale / k_norm.scale [D]`.

Chunk-wise (SeCO) cache of one layer, `kv` = {"k": [B,S,Hkv,D] after RoPE, "v": [B,S,Hkv,D], "segment_ids": [B,S],
"token_index": [B,S]}: with `prefix_kv` the layer attends to [prefix ++ own keys] by global token index; with
`return_kv=True` it also returns its own keys in that layout.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from longtrain.models import attention_site
from longtrain.models.layers import dense, normal_init, ones, rms_norm, zeros
from longtrain.models.rope import apply_rope

ATTENTION_OUTPUT = "attention_output"  # checkpoint name saved by remat="save_attention_output"


def init_attention(config, rng) -> dict:
    E, Hq, Hkv, D = config.hidden_size, config.num_heads, config.num_kv_heads, config.resolved_head_dim
    std, pdt = config.init_std, config.param_dtype
    rq, rk, rv, ro = jax.random.split(rng, 4)
    p = {
        "q_proj": {"kernel": normal_init(rq, (E, Hq, D), std, pdt)},
        "k_proj": {"kernel": normal_init(rk, (E, Hkv, D), std, pdt)},
        "v_proj": {"kernel": normal_init(rv, (E, Hkv, D), std, pdt)},
        "o_proj": {"kernel": normal_init(ro, (Hq, D, E), std, pdt)},
    }
    if config.attention_bias:
        p["q_proj"]["bias"] = zeros((Hq, D), pdt)
        p["k_proj"]["bias"] = zeros((Hkv, D), pdt)
        p["v_proj"]["bias"] = zeros((Hkv, D), pdt)
    if config.attention_out_bias:
        p["o_proj"]["bias"] = zeros((E,), pdt)
    if config.qk_norm:
        p["q_norm"] = {"scale": ones((D,), pdt)}
        p["k_norm"] = {"scale": ones((D,), pdt)}
    return p


def attention_logical_axes(config) -> dict:
    axes = {
        "q_proj": {"kernel": ("embed", "heads", "head_dim")},
        "k_proj": {"kernel": ("embed", "kv_heads", "head_dim")},
        "v_proj": {"kernel": ("embed", "kv_heads", "head_dim")},
        "o_proj": {"kernel": ("heads", "head_dim", "embed")},
    }
    if config.attention_bias:
        axes["q_proj"]["bias"] = ("heads", "head_dim")
        axes["k_proj"]["bias"] = ("kv_heads", "head_dim")
        axes["v_proj"]["bias"] = ("kv_heads", "head_dim")
    if config.attention_out_bias:
        axes["o_proj"]["bias"] = ("embed",)
    if config.qk_norm:
        axes["q_norm"] = {"scale": ("head_dim",)}
        axes["k_norm"] = {"scale": ("head_dim",)}
    return axes


def _concat_prefix(prefix_kv, k_BTHD, v_BTHD, segment_ids_BT, token_index_BT):
    """Keys/values of [prefix ++ this chunk] and the mask arguments of `attention_with_prefix`."""
    for name in ("k", "v", "segment_ids", "token_index"):
        if name not in prefix_kv:
            raise KeyError(f"kv_prefix entry of a softmax layer lacks {name!r}; it needs k, v, segment_ids, "
                           f"token_index")
    k_all = jnp.concatenate([prefix_kv["k"].astype(k_BTHD.dtype), k_BTHD], axis=1)
    v_all = jnp.concatenate([prefix_kv["v"].astype(v_BTHD.dtype), v_BTHD], axis=1)
    mask = {
        "q_index": token_index_BT,
        "kv_index": jnp.concatenate([prefix_kv["token_index"].astype(jnp.int32), token_index_BT], axis=1),
        "q_segment_ids": segment_ids_BT,
        "kv_segment_ids": jnp.concatenate([prefix_kv["segment_ids"].astype(jnp.int32), segment_ids_BT], axis=1),
    }
    return k_all, v_all, mask


def apply_attention(config, p, x_BTE, *, cos_sin, segment_ids, token_index, runtime, prefix_kv=None,
                    return_kv=False, sliding_window=None):
    """One attention layer on normed input `x [B,T,E]` -> `[B,T,E]` (and this chunk's kv cache if `return_kv`).

    `cos_sin` = `rope.rope_cos_sin(config, positions, dtype)`; `segment_ids [B,T]` (None = one document);
    `token_index [B,T]` global indices (only used with `prefix_kv` / `return_kv`).
    """
    if return_kv:
        attention_site.require_local(runtime, "return_kv (chunk-wise caches)")
    dt = config.dtype
    q_BTHD = dense(x_BTE, p["q_proj"]["kernel"], p["q_proj"].get("bias"), dtype=dt)
    k_BTHD = dense(x_BTE, p["k_proj"]["kernel"], p["k_proj"].get("bias"), dtype=dt)
    v_BTHD = dense(x_BTE, p["v_proj"]["kernel"], p["v_proj"].get("bias"), dtype=dt)
    if config.qk_norm:
        q_BTHD = rms_norm(q_BTHD, p["q_norm"]["scale"], config.rms_norm_eps)
        k_BTHD = rms_norm(k_BTHD, p["k_norm"]["scale"], config.rms_norm_eps)
    cos, sin = cos_sin
    q_BTHD, k_BTHD = apply_rope(q_BTHD, cos, sin), apply_rope(k_BTHD, cos, sin)
    q_BTHD = runtime.constrain(q_BTHD, ("batch", "seq", "heads", "head_dim"))
    k_BTHD = runtime.constrain(k_BTHD, ("batch", "seq", "kv_heads", "head_dim"))
    v_BTHD = runtime.constrain(v_BTHD, ("batch", "seq", "kv_heads", "head_dim"))

    scale = config.resolved_head_dim ** -0.5
    if prefix_kv is not None:
        seg_BT = segment_ids if segment_ids is not None else jnp.ones(token_index.shape, jnp.int32)
        k_all, v_all, mask = _concat_prefix(prefix_kv, k_BTHD, v_BTHD, seg_BT, token_index)
        out_BTHD = attention_site.softmax_attention(runtime, q_BTHD, k_all, v_all, segment_ids=None,
                                                    sliding_window=sliding_window, scale=scale, prefix=mask)
    else:
        out_BTHD = attention_site.softmax_attention(runtime, q_BTHD, k_BTHD, v_BTHD, segment_ids=segment_ids,
                                                    sliding_window=sliding_window, scale=scale)
    out_BTHD = checkpoint_name(out_BTHD.astype(q_BTHD.dtype), ATTENTION_OUTPUT)
    out_BTE = dense(out_BTHD, p["o_proj"]["kernel"], p["o_proj"].get("bias"), dtype=dt, contract=2)
    if not return_kv:
        return out_BTE
    seg_BT = segment_ids if segment_ids is not None else jnp.ones(token_index.shape, jnp.int32)
    kv = {"k": k_BTHD, "v": v_BTHD, "segment_ids": seg_BT.astype(jnp.int32), "token_index": token_index}
    return out_BTE, kv
