"""`Attention`: the softmax attention layer (an NNX module) of every decoder and of the MiniMax softmax layers.

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

import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from longtrain.models import attention_site
from longtrain.models.layers import Linear, RMSNorm, module_keys
from longtrain.models.rope import apply_rope

ATTENTION_OUTPUT = "attention_output"  # checkpoint name saved by remat="save_attention_output"


class Attention(nnx.Module):
    """One softmax attention layer (see the module docstring for its parameters and caches)."""

    def __init__(self, config, *, rngs: nnx.Rngs | None = None, key=None):
        E, Hq, Hkv, D = config.hidden_size, config.num_heads, config.num_kv_heads, config.resolved_head_dim
        self.config = config
        kq, kk, kv, ko = module_keys(rngs, key, 4)
        self.q_proj = Linear((E,), (Hq, D), ("embed",), ("heads", "head_dim"), config, key=kq,
                             use_bias=config.attention_bias)
        self.k_proj = Linear((E,), (Hkv, D), ("embed",), ("kv_heads", "head_dim"), config, key=kk,
                             use_bias=config.attention_bias)
        self.v_proj = Linear((E,), (Hkv, D), ("embed",), ("kv_heads", "head_dim"), config, key=kv,
                             use_bias=config.attention_bias)
        self.o_proj = Linear((Hq, D), (E,), ("heads", "head_dim"), ("embed",), config, key=ko,
                             use_bias=config.attention_out_bias)
        self.q_norm = RMSNorm((D,), ("head_dim",), config, config.rms_norm_eps) if config.qk_norm else None
        self.k_norm = RMSNorm((D,), ("head_dim",), config, config.rms_norm_eps) if config.qk_norm else None

    def __call__(self, x_BTE, *, cos_sin, segment_ids, token_index, runtime, prefix_kv=None, return_kv=False,
                 sliding_window=None):
        """Normed input `x [B,T,E]` -> `[B,T,E]` (and this chunk's kv cache if `return_kv`).

        `cos_sin` = `rope.rope_cos_sin(config, positions, dtype)`; `segment_ids [B,T]` (None = one document);
        `token_index [B,T]` global indices (only used with `prefix_kv` / `return_kv`).
        """
        if return_kv:
            attention_site.require_local(runtime, "return_kv (chunk-wise caches)")
        q_BTHD, k_BTHD, v_BTHD = self.q_proj(x_BTE), self.k_proj(x_BTE), self.v_proj(x_BTE)
        if self.q_norm is not None:
            q_BTHD, k_BTHD = self.q_norm(q_BTHD), self.k_norm(k_BTHD)
        cos, sin = cos_sin
        q_BTHD, k_BTHD = apply_rope(q_BTHD, cos, sin), apply_rope(k_BTHD, cos, sin)
        q_BTHD = runtime.constrain(q_BTHD, ("batch", "seq", "heads", "head_dim"))
        k_BTHD = runtime.constrain(k_BTHD, ("batch", "seq", "kv_heads", "head_dim"))
        v_BTHD = runtime.constrain(v_BTHD, ("batch", "seq", "kv_heads", "head_dim"))

        scale = self.config.resolved_head_dim ** -0.5
        if prefix_kv is not None:
            seg_BT = segment_ids if segment_ids is not None else jnp.ones(token_index.shape, jnp.int32)
            k_all, v_all, mask = _concat_prefix(prefix_kv, k_BTHD, v_BTHD, seg_BT, token_index)
            out_BTHD = attention_site.softmax_attention(runtime, q_BTHD, k_all, v_all, segment_ids=None,
                                                        sliding_window=sliding_window, scale=scale, prefix=mask)
        else:
            out_BTHD = attention_site.softmax_attention(runtime, q_BTHD, k_BTHD, v_BTHD, segment_ids=segment_ids,
                                                        sliding_window=sliding_window, scale=scale)
        out_BTHD = checkpoint_name(out_BTHD.astype(q_BTHD.dtype), ATTENTION_OUTPUT)
        out_BTE = self.o_proj(out_BTHD)
        if not return_kv:
            return out_BTE
        seg_BT = segment_ids if segment_ids is not None else jnp.ones(token_index.shape, jnp.int32)
        kv = {"k": k_BTHD, "v": v_BTHD, "segment_ids": seg_BT.astype(jnp.int32), "token_index": token_index}
        return out_BTE, kv


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
