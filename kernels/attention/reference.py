"""Naive masked softmax attention: the oracle every fast path is tested against.

Masks are built from per-token global indices (`q_index`, `kv_index`: position of the token in the full
sequence, used for causality and sliding windows) and segment ids (packed documents, 0 = padding). A row with no
visible key gives output 0 and lse = -inf, never NaN.
"""
from __future__ import annotations

import jax.numpy as jnp

from longtrain.kernels.attention import masks


def attention_mask(q_index, kv_index, q_segment_ids, kv_segment_ids, causal, sliding_window):
    """Boolean mask [B, T, S]: True where query t may attend to key s (the same rule every kernel uses).

    A window of W keys is the query itself and W-1 before it (Mistral / HF convention); without segment ids
    every token is in one document.
    """
    if q_segment_ids is None:
        q_segment_ids, kv_segment_ids = jnp.ones(q_index.shape, jnp.int32), jnp.ones(kv_index.shape, jnp.int32)
    return masks.visible(q_index[:, :, None], kv_index[:, None, :], q_segment_ids[:, :, None],
                         kv_segment_ids[:, None, :], causal, sliding_window)


def attention_block_reference(q, k, v, *, q_index, kv_index, q_segment_ids=None, kv_segment_ids=None,
                              causal=True, sliding_window=None, scale=None):
    """One query block against one key block. Returns (out fp32 [B,T,Hq,D], lse fp32 [B,Hq,T]).

    GQA: query head h reads key/value head h // (Hq // Hkv).
    """
    B, T, Hq, D = q.shape
    Hkv = k.shape[2]
    rep = Hq // Hkv
    scale = D ** -0.5 if scale is None else scale
    dt = jnp.promote_types(q.dtype, jnp.float32)  # fp32, or fp64 for the fp64 oracle
    qf = q.astype(dt).reshape(B, T, Hkv, rep, D)
    kf, vf = k.astype(dt), v.astype(dt)
    logits = jnp.einsum("btgrd,bsgd->bgrts", qf, kf) * scale
    mask = attention_mask(q_index, kv_index, q_segment_ids, kv_segment_ids, causal, sliding_window)
    logits = jnp.where(mask[:, None, None], logits, -jnp.inf)
    m = jnp.max(logits, axis=-1, keepdims=True)
    m_safe = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.exp(logits - m_safe)
    l = jnp.sum(p, axis=-1, keepdims=True)
    out = jnp.einsum("bgrts,bsgd->btgrd", p / jnp.where(l > 0, l, 1.0), vf).reshape(B, T, Hq, D)
    lse = jnp.where(l[..., 0] > 0, jnp.log(jnp.where(l[..., 0] > 0, l[..., 0], 1.0)) + m_safe[..., 0], -jnp.inf)
    return out, lse.reshape(B, Hq, T)


def merge_partials(out_a, lse_a, out_b, lse_b):
    """Combine two partial attentions over disjoint key sets (fp32; -inf lse = no keys seen)."""
    lse = jnp.logaddexp(lse_a, lse_b)
    lse_safe = jnp.where(jnp.isfinite(lse), lse, 0.0)
    wa = jnp.where(jnp.isfinite(lse_a), jnp.exp(lse_a - lse_safe), 0.0)
    wb = jnp.where(jnp.isfinite(lse_b), jnp.exp(lse_b - lse_safe), 0.0)
    to_bthd = lambda w: jnp.swapaxes(w, 1, 2)[..., None]  # [B,H,T] -> [B,T,H,1]
    return to_bthd(wa) * out_a + to_bthd(wb) * out_b, lse


def attention_reference(q, k, v, *, segment_ids=None, causal=True, sliding_window=None, scale=None,
                        return_lse=False):
    """Self-attention over the whole sequence (q, k, v share the token axis when segment_ids are given)."""
    # bottom-right aligned causality when T != S (a query block at the end of the keys)
    q_index, kv_index = masks.self_attention_indices(q.shape[0], q.shape[1], k.shape[1])
    out, lse = attention_block_reference(
        q, k, v, q_index=q_index, kv_index=kv_index, q_segment_ids=segment_ids,
        kv_segment_ids=segment_ids, causal=causal, sliding_window=sliding_window, scale=scale,
    )
    out = out.astype(q.dtype)
    return (out, lse) if return_lse else out


def attention_block_bwd_reference(q, k, v, out, lse, dout, **mask_kwargs):
    """Gradients (dq, dk, dv) in fp32 of one block, given the *global* out and lse (so blocks sum exactly)."""
    B, T, Hq, D = q.shape
    Hkv = k.shape[2]
    rep = Hq // Hkv
    scale = mask_kwargs.pop("scale", None)
    scale = D ** -0.5 if scale is None else scale
    dt = jnp.promote_types(q.dtype, jnp.float32)
    qf = q.astype(dt).reshape(B, T, Hkv, rep, D)
    kf, vf = k.astype(dt), v.astype(dt)
    do = dout.astype(dt).reshape(B, T, Hkv, rep, D)
    o = out.astype(dt).reshape(B, T, Hkv, rep, D)
    mask = attention_mask(mask_kwargs["q_index"], mask_kwargs["kv_index"], mask_kwargs.get("q_segment_ids"),
                          mask_kwargs.get("kv_segment_ids"), mask_kwargs.get("causal", True),
                          mask_kwargs.get("sliding_window"))
    logits = jnp.einsum("btgrd,bsgd->bgrts", qf, kf) * scale
    lse_g = lse.reshape(B, Hkv, rep, T)[..., None]
    p = jnp.where(mask[:, None, None] & jnp.isfinite(lse_g), jnp.exp(logits - jnp.where(jnp.isfinite(lse_g), lse_g, 0.0)), 0.0)
    dv = jnp.einsum("bgrts,btgrd->bsgd", p, do)
    dp = jnp.einsum("btgrd,bsgd->bgrts", do, vf)
    delta = jnp.einsum("btgrd,btgrd->bgrt", o, do)[..., None]
    ds = p * (dp - delta) * scale
    dq = jnp.einsum("bgrts,bsgd->btgrd", ds, kf).reshape(B, T, Hq, D)
    dk = jnp.einsum("bgrts,btgrd->bsgd", ds, qf)
    return dq, dk, dv

