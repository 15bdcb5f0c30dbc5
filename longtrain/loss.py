"""Memory-lean causal-LM loss: cross-entropy (+ z-loss) without ever forming the fp32 `[B, T, V]` logits.

`lm_loss(hidden_BTE, w_EV, targets_BT, loss_mask_BT, num_targets=N)` equals

    sum_{b,t} mask[b,t] * (lse[b,t] - logit[b,t,target] + z_loss * lse[b,t]**2) / N,

with `logit = hidden @ w` and `lse = logsumexp(logit)` over the vocabulary. `N` comes from outside (the number of
target tokens of the whole global batch) so micro-batches and SeCO chunks are normalised globally, never as a mean
of per-piece means.

How it stays small: a custom VJP tiles the sequence into `token_chunk`-token pieces (keeping the batch axis whole, so
a data-parallel sharding of B is untouched) and the vocabulary into `vocab_chunk`-column tiles. The forward pass keeps
an online log-sum-exp over vocab tiles and saves only `lse [B, T]`; the backward pass recomputes each tile's logits,
forms `dlogits = g * ((1 + 2 z lse) softmax - onehot)` for that tile and accumulates `dhidden` and `dw`. Peak
temporary memory is a few `[B, token_chunk, vocab_chunk]` tiles, an fp32 `[B, T, E]` dhidden accumulator and the
`[E, V]` weight gradient in w's dtype (each vocab tile's fp32 sum is finished before it is written).

Precision: the matmuls run in `hidden`'s dtype (w is cast to it) with fp32 accumulation (fp64 when the inputs are
fp64); lse and the loss are fp32 (fp64 under x64). T and V need not be multiples of the tiles (padded, masked).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

DEFAULT_TOKEN_CHUNK = 512
DEFAULT_VOCAB_CHUNK = 8192


def _acc_dtype(dtype):
    """The accumulation dtype for matmuls and statistics: fp32, or fp64 when the inputs are fp64."""
    return jnp.promote_types(dtype, jnp.float32)


def lm_loss(hidden_BTE, w_EV, targets_BT, loss_mask_BT, *, num_targets, z_loss: float = 0.0,
            token_chunk: int = DEFAULT_TOKEN_CHUNK, vocab_chunk: int | None = DEFAULT_VOCAB_CHUNK):
    """Sum of masked token losses / `num_targets`, tiled over tokens and vocab (see the module docstring).

    hidden_BTE: [B,T,E] final-norm output (compute dtype); w_EV: [E,V] LM head; targets_BT: int [B,T] next-token
    ids (any value where the mask is 0); loss_mask_BT: [B,T] bool or float weights; num_targets: scalar (Python or
    traced) normaliser; z_loss: Python float coefficient of lse^2; token_chunk / vocab_chunk: tile sizes
    (`vocab_chunk=None` = whole vocab per tile). Differentiable w.r.t. hidden, w (and the mask weights).
    """
    if hidden_BTE.ndim != 3:
        raise ValueError(f"hidden_BTE must be [B,T,E]; got shape {hidden_BTE.shape}")
    B, T, E = hidden_BTE.shape
    if w_EV.ndim != 2 or w_EV.shape[0] != E:
        raise ValueError(f"w_EV must be [E={E}, V]; got shape {w_EV.shape}")
    if targets_BT.shape != (B, T):
        raise ValueError(f"targets_BT must be [B,T]={(B, T)}; got shape {targets_BT.shape}")
    if loss_mask_BT.shape != (B, T):
        raise ValueError(f"loss_mask_BT must be [B,T]={(B, T)}; got shape {loss_mask_BT.shape}")
    if not jnp.issubdtype(targets_BT.dtype, jnp.integer):
        raise TypeError(f"targets_BT must be integer token ids; got dtype {targets_BT.dtype}")
    if not isinstance(z_loss, (int, float)) or z_loss < 0:
        raise ValueError(f"z_loss must be a Python float >= 0; got {z_loss!r}")
    if not isinstance(token_chunk, int) or token_chunk <= 0:
        raise ValueError(f"token_chunk must be a positive int; got {token_chunk!r}")
    if vocab_chunk is not None and (not isinstance(vocab_chunk, int) or vocab_chunk <= 0):
        raise ValueError(f"vocab_chunk must be a positive int or None; got {vocab_chunk!r}")
    V = w_EV.shape[1]
    acc = _acc_dtype(hidden_BTE.dtype)
    weights_BT = loss_mask_BT.astype(acc) / jnp.asarray(num_targets, acc)
    tc = min(token_chunk, T)
    vc = V if vocab_chunk is None else min(vocab_chunk, V)
    return _tiled_loss(hidden_BTE, w_EV, targets_BT.astype(jnp.int32), weights_BT, float(z_loss), tc, vc)


def lm_loss_reference(hidden_BTE, w_EV, targets_BT, loss_mask_BT, *, num_targets, z_loss: float = 0.0):
    """The naive oracle: full [B,T,V] logits in the accumulation dtype. Same formula as `lm_loss`."""
    acc = _acc_dtype(hidden_BTE.dtype)
    logits = jnp.einsum("bte,ev->btv", hidden_BTE, w_EV.astype(hidden_BTE.dtype), preferred_element_type=acc)
    lse = jax.nn.logsumexp(logits, axis=-1)
    tgt = jnp.take_along_axis(logits, targets_BT[..., None].astype(jnp.int32), axis=-1)[..., 0]
    per_token = lse - tgt + z_loss * lse**2
    return jnp.sum(loss_mask_BT.astype(acc) * per_token) / jnp.asarray(num_targets, acc)


# ---------------------------------------------------------------------------------------------------------------
# The tiled kernel. Shapes inside: Tp = T padded to tc, Vp = V padded to vc; nT = Tp/tc, nV = Vp/vc.


def _pad_axis(x, size, axis, value=0):
    extra = size - x.shape[axis]
    if extra == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths, constant_values=value)


def _padded_inputs(hidden_BTE, w_EV, targets_BT, weights_BT, tc, vc):
    T, V = hidden_BTE.shape[1], w_EV.shape[1]
    Tp, Vp = -(-T // tc) * tc, -(-V // vc) * vc
    return (_pad_axis(hidden_BTE, Tp, 1), _pad_axis(w_EV.astype(hidden_BTE.dtype), Vp, 1),
            _pad_axis(targets_BT, Tp, 1), _pad_axis(weights_BT, Tp, 1))


def _tile_logits(h_BCE, w_EVp, j, vc, V, acc):
    """Logits [B,C,vc] of vocab tile j (columns past V are -inf) and the global column ids [vc]."""
    w_tile = jax.lax.dynamic_slice_in_dim(w_EVp, j * vc, vc, axis=1)
    logits = jnp.einsum("bce,ev->bcv", h_BCE, w_tile, preferred_element_type=acc)
    cols = j * vc + jnp.arange(vc)
    return jnp.where(cols < V, logits, -jnp.inf), cols, w_tile


def _forward_stats(hp, wp, tp, tc, vc, V):
    """Per-token lse and target logit [B,Tp] (accumulation dtype) by an online log-sum-exp over vocab tiles."""
    B, Tp, _ = hp.shape
    acc = _acc_dtype(hp.dtype)
    n_vocab_tiles = wp.shape[1] // vc

    def token_chunk_stats(_, c):
        h = jax.lax.dynamic_slice_in_dim(hp, c * tc, tc, axis=1)
        tgt = jax.lax.dynamic_slice_in_dim(tp, c * tc, tc, axis=1)

        def vocab_tile(carry, j):
            m, s, tgt_logit = carry
            logits, cols, _ = _tile_logits(h, wp, j, vc, V, acc)
            m_new = jnp.maximum(m, jnp.max(logits, axis=-1))
            s = s * jnp.exp(m - m_new) + jnp.sum(jnp.exp(logits - m_new[..., None]), axis=-1)
            tgt_logit = tgt_logit + jnp.sum(jnp.where(cols == tgt[..., None], logits, 0.0), axis=-1)
            return (m_new, s, tgt_logit), None

        init = (jnp.full((B, tc), -jnp.inf, acc), jnp.zeros((B, tc), acc), jnp.zeros((B, tc), acc))
        (m, s, tgt_logit), _ = jax.lax.scan(vocab_tile, init, jnp.arange(n_vocab_tiles))
        return None, (m + jnp.log(s), tgt_logit)

    _, (lse, tgt_logit) = jax.lax.scan(token_chunk_stats, None, jnp.arange(Tp // tc))
    # [nT,B,tc] -> [B,Tp]
    return jnp.moveaxis(lse, 0, 1).reshape(B, Tp), jnp.moveaxis(tgt_logit, 0, 1).reshape(B, Tp)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _tiled_loss(hidden_BTE, w_EV, targets_BT, weights_BT, z_loss, tc, vc):
    loss, _ = _tiled_loss_fwd(hidden_BTE, w_EV, targets_BT, weights_BT, z_loss, tc, vc)
    return loss


def _tiled_loss_fwd(hidden_BTE, w_EV, targets_BT, weights_BT, z_loss, tc, vc):
    hp, wp, tp, weights_p = _padded_inputs(hidden_BTE, w_EV, targets_BT, weights_BT, tc, vc)
    lse, tgt_logit = _forward_stats(hp, wp, tp, tc, vc, w_EV.shape[1])
    per_token = lse - tgt_logit + z_loss * lse**2  # [B,Tp]
    loss = jnp.sum(weights_p * per_token)
    return loss, (hidden_BTE, w_EV, targets_BT, weights_BT, lse, per_token)


def _tiled_loss_bwd(z_loss, tc, vc, residuals, g):
    hidden_BTE, w_EV, targets_BT, weights_BT, lse, per_token = residuals
    B, T, E = hidden_BTE.shape
    V = w_EV.shape[1]
    hp, wp, tp, weights_p = _padded_inputs(hidden_BTE, w_EV, targets_BT, weights_BT, tc, vc)
    Tp, Vp = hp.shape[1], wp.shape[1]
    acc = _acc_dtype(hp.dtype)
    # d loss / d per_token = g * weight; d per_token / d lse = 1 + 2 z lse; d lse / d logits = softmax.
    scale_BT = g * weights_p
    lse_factor_BT = scale_BT * (1.0 + 2.0 * z_loss * lse)

    # Vocab tiles outer, token chunks inner: each finished dw tile is written once in w's dtype, so no fp32 [E, V]
    # accumulator exists; dhidden accumulates in fp32 [B, Tp, E] (activation-sized).
    def vocab_tile_grads(carry, j):
        dh, dw = carry

        def token_chunk(inner, c):
            dh, dw_tile = inner
            h = jax.lax.dynamic_slice_in_dim(hp, c * tc, tc, axis=1)
            tgt = jax.lax.dynamic_slice_in_dim(tp, c * tc, tc, axis=1)
            lse_c, scale_c, factor_c = (jax.lax.dynamic_slice_in_dim(x, c * tc, tc, axis=1)
                                        for x in (lse, scale_BT, lse_factor_BT))
            logits, cols, w_tile = _tile_logits(h, wp, j, vc, V, acc)
            probs = jnp.exp(logits - lse_c[..., None])  # 0 on padded columns
            onehot = (cols == tgt[..., None]).astype(acc)
            dlogits = (factor_c[..., None] * probs - scale_c[..., None] * onehot).astype(hp.dtype)
            dh_c = jax.lax.dynamic_slice_in_dim(dh, c * tc, tc, axis=1)
            dh_c = dh_c + jnp.einsum("bcv,ev->bce", dlogits, w_tile, preferred_element_type=acc)
            dh = jax.lax.dynamic_update_slice_in_dim(dh, dh_c, c * tc, axis=1)
            dw_tile = dw_tile + jnp.einsum("bce,bcv->ev", h, dlogits, preferred_element_type=acc)
            return (dh, dw_tile), None

        (dh, dw_tile), _ = jax.lax.scan(token_chunk, (dh, jnp.zeros((E, vc), acc)), jnp.arange(Tp // tc))
        dw = jax.lax.dynamic_update_slice_in_dim(dw, dw_tile.astype(dw.dtype), j * vc, axis=1)
        return (dh, dw), None

    init = (jnp.zeros((B, Tp, E), acc), jnp.zeros((E, Vp), w_EV.dtype))
    (dh, dw), _ = jax.lax.scan(vocab_tile_grads, init, jnp.arange(Vp // vc))
    dh = dh[:, :T].astype(hidden_BTE.dtype)
    dweights = (g * per_token[:, :T]).astype(weights_BT.dtype)
    return dh, dw[:, :V], None, dweights


_tiled_loss.defvjp(_tiled_loss_fwd, _tiled_loss_bwd)
