"""Blockwise (flash) softmax attention in pure JAX: memory O(T*D), custom VJP that recomputes in backward.

Forward: a scan over query blocks; for each, a loop over only the key blocks that can be visible (a span from
per-block index/segment ranges, and a `lax.cond` that skips holes inside it) with an online softmax. Only
`out` (fp32) and `lse` (fp32) are saved. Backward: a scan over key blocks; for each, a loop over the query
blocks that can see it, accumulating dk/dv for the block and dq into one [B,T,H,D] fp32 buffer.

GQA: q is viewed as [B, T, Hkv, rep, D]; query head h reads kv head h // rep, K/V are never repeated.
All entry points take GLOBAL indices, so `attention()` and the ring strategies' `attention_block()` share it.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from longtrain.kernels.attention import masks

# Default (query, key) block sizes, forward and backward. Small score blocks keep the memory of the backward,
# where p, dp and ds of a block are live together, far below the q-sized arrays (H=8: a 128x256 fp32 block is
# 1 MiB), and on CPU they also ran faster than 512x512 (benchmarks/ring_memory.py shapes, N=8K on 8 simulated
# devices, when they were chosen: 2.05 s against 2.83 s). `block_q`/`block_k`/`block_q_bwd`/`block_k_bwd`
# override them.
DEFAULT_BLOCKS = (256, 256)
DEFAULT_BLOCKS_BWD = (128, 256)


def _block_sizes(T, S, block_q, block_k, block_q_bwd=None, block_k_bwd=None):
    """(bq, bk, bq_bwd, bk_bwd): the requested or default sizes, at most the (8-rounded) lengths."""
    cap_q, cap_k = masks.round_up(T, 8), masks.round_up(S, 8)
    return (min(block_q or DEFAULT_BLOCKS[0], cap_q), min(block_k or DEFAULT_BLOCKS[1], cap_k),
            min(block_q_bwd or DEFAULT_BLOCKS_BWD[0], cap_q), min(block_k_bwd or DEFAULT_BLOCKS_BWD[1], cap_k))


def _prepare(q, k, v, q_index, kv_index, q_seg, kv_seg, bq, bk):
    """Pad tokens to block multiples; padding gets segment 0. Arrays stay [B, T, H, D]: a query block is viewed per
    kv head only once sliced (`_row_views`), so no full-size array is ever re-laid out."""
    T, S = q.shape[1], k.shape[1]
    Tp, Sp = masks.round_up(T, bq), masks.round_up(S, bk)
    q = masks.pad_tokens(q, Tp, 1)
    k, v = masks.pad_tokens(k, Sp, 1), masks.pad_tokens(v, Sp, 1)
    q_index, kv_index = masks.pad_tokens(q_index, Tp, 1, "edge"), masks.pad_tokens(kv_index, Sp, 1, "edge")
    q_seg, kv_seg = masks.pad_tokens(q_seg, Tp, 1), masks.pad_tokens(kv_seg, Sp, 1)
    return q, k, v, q_index, kv_index, q_seg, kv_seg


SKIP, MASKED, FULL = 0, 1, 2  # what a (query block, key block) pair needs: nothing, a mask, or no mask


def _pair_kinds(q_index, kv_index, q_seg, kv_seg, bq, bk, causal, sliding_window):
    """(int32 [nq, nk] of SKIP / MASKED / FULL, boolean [nq, nk] needed). Fully visible pairs (every off-diagonal
    block of a causal ring step) run without building or applying a mask."""
    q_ranges, kv_ranges = masks.block_ranges(q_index, q_seg, bq), masks.block_ranges(kv_index, kv_seg, bk)
    need = masks.block_pairs_needed(q_ranges, kv_ranges, causal, sliding_window)
    full = masks.block_pairs_full(q_ranges, kv_ranges, masks.block_padded(q_seg, bq), masks.block_padded(kv_seg, bk),
                                  causal, sliding_window)
    return jnp.where(need & full, FULL, jnp.where(need, MASKED, SKIP)).astype(jnp.int32), need


def _block_mask(qi_idx, qi_seg, kj_idx, kj_seg, causal, sliding_window):
    """[B, 1, 1, bq, bk] visibility for the [B, Hkv, rep, bq, bk] logits."""
    m = masks.visible(qi_idx[:, :, None], kj_idx[:, None, :], qi_seg[:, :, None], kj_seg[:, None, :], causal,
                      sliding_window)
    return m[:, None, None]


def _row_views(B, bq, Hkv, rep, D):
    """(to_rows, from_rows): a query block [B, bq, Hq, D] as [B, Hkv, rep*bq, D] and back. The rows of a kv head
    are its rep query heads' tokens ((head, token) order, as a [B, Hq, bq] row statistic reshapes), so one 4-D
    matmul per kv head serves them all and the score block [B, Hkv, rep*bq, bk] has no size-1 axes for XLA to
    copy around."""

    def to_rows(x):
        return x.reshape(B, bq, Hkv, rep, D).transpose(0, 2, 3, 1, 4).reshape(B, Hkv, rep * bq, D)

    def from_rows(x):
        return x.reshape(B, Hkv, rep, bq, D).transpose(0, 3, 1, 2, 4).reshape(B, bq, Hkv * rep, D)

    return to_rows, from_rows


def _forward(q, k, v, q_index, kv_index, q_seg, kv_seg, *, causal, sliding_window, scale, bq, bk, merge_into=None):
    """(out fp32 [B,T,Hq,D], lse fp32 [B,Hq,T]).

    `merge_into` (optional (out fp32, lse) of the same queries over other keys): the result is the merge of that
    partial and this block's, computed by starting each query block's online softmax from it (running max = its
    lse, sum = 1, accumulator = its out) and written over it block by block, so a ring merging P partials holds
    one (out, lse) pair instead of the running pair, a fresh partial and their merge."""
    B, T, Hq, D = q.shape
    Hkv = k.shape[2]
    rep = Hq // Hkv
    q, k, v, q_index, kv_index, q_seg, kv_seg = _prepare(q, k, v, q_index, kv_index, q_seg, kv_seg, bq, bk)
    Tp = q.shape[1]
    kind, need = _pair_kinds(q_index, kv_index, q_seg, kv_seg, bq, bk, causal, sliding_window)
    lo, hi = masks.needed_span(need)
    if merge_into is None:
        out_acc = jnp.zeros(q.shape, jnp.float32)
        lse_acc = jnp.full((B, Hq, Tp), -jnp.inf, jnp.float32)
    else:  # padded query rows start with no keys seen (lse -inf)
        out_acc = masks.pad_tokens(merge_into[0].astype(jnp.float32), Tp, 1)
        lse_acc = jnp.pad(merge_into[1].astype(jnp.float32), ((0, 0), (0, 0), (0, Tp - T)),
                          constant_values=-jnp.inf)
    rows = rep * bq
    to_rows, from_rows = _row_views(B, bq, Hkv, rep, D)

    def q_block(i, accs):
        out_acc, lse_acc = accs
        qi = to_rows(lax.dynamic_slice_in_dim(q, i * bq, bq, axis=1))
        qi_idx = lax.dynamic_slice_in_dim(q_index, i * bq, bq, axis=1)
        qi_seg = lax.dynamic_slice_in_dim(q_seg, i * bq, bq, axis=1)

        def attend(masked, j, carry):
            m, l, acc = carry                                       # [B,Hkv,rows], [B,Hkv,rows], [B,Hkv,rows,D]
            kj = lax.dynamic_slice_in_dim(k, j * bk, bk, axis=1)
            vj = lax.dynamic_slice_in_dim(v, j * bk, bk, axis=1)
            s = jnp.einsum("bgqd,bkgd->bgqk", qi, kj, preferred_element_type=jnp.float32) * scale
            if masked:
                mask = _block_mask(qi_idx, qi_seg, lax.dynamic_slice_in_dim(kv_index, j * bk, bk, axis=1),
                                   lax.dynamic_slice_in_dim(kv_seg, j * bk, bk, axis=1), causal, sliding_window)
                s = jnp.where(mask, s.reshape(B, Hkv, rep, bq, bk), -jnp.inf).reshape(s.shape)
            m_new = jnp.maximum(m, s.max(-1))
            m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)  # all-masked so far: keep exp() at 0, not NaN
            alpha = jnp.exp(m - m_safe)
            p = jnp.exp(s - m_safe[..., None])
            pv = jnp.einsum("bgqk,bkgd->bgqd", p.astype(v.dtype), vj, preferred_element_type=jnp.float32)
            return m_new, alpha * l + p.sum(-1), alpha[..., None] * acc + pv

        def maybe_attend(j, carry):
            return lax.switch(kind[i, j], branches, j, carry)

        # indexed by SKIP, MASKED, FULL
        branches = (lambda _, c: c, functools.partial(attend, True), functools.partial(attend, False))

        # the online-softmax state of what is already in the accumulators: max = lse, sum = 1, acc = out
        lse_prev = lax.dynamic_slice_in_dim(lse_acc, i * bq, bq, axis=2).reshape(B, Hkv, rows)
        out_prev = to_rows(lax.dynamic_slice_in_dim(out_acc, i * bq, bq, axis=1))
        seen_before = jnp.isfinite(lse_prev)
        init = (lse_prev, seen_before.astype(jnp.float32), jnp.where(seen_before[..., None], out_prev, 0.0))
        m, l, acc = lax.fori_loop(lo[i], hi[i], maybe_attend, init)
        seen = l > 0
        out = acc / jnp.where(seen, l, 1.0)[..., None]
        lse = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), -jnp.inf)
        return (lax.dynamic_update_slice_in_dim(out_acc, from_rows(out), i * bq, axis=1),
                lax.dynamic_update_slice_in_dim(lse_acc, lse.reshape(B, Hq, bq), i * bq, axis=2))

    out, lse = lax.fori_loop(0, Tp // bq, q_block, (out_acc, lse_acc))
    return out[:, :T], lse[:, :, :T]


def _backward(q, k, v, out, lse, dout, q_index, kv_index, q_seg, kv_seg, *, causal, sliding_window, scale, bq, bk,
              dlse=None, grads_into=None):
    """(dq, dk, dv) fp32 given out and lse (global, i.e. over all keys) and the output cotangent.

    `dlse` (cotangent of lse, optional) enters as ds = p * (dp - (delta - dlse)), since d lse / d s = p.
    `grads_into` (optional fp32 (dq, dk, dv), the shapes of q, k, v): the gradients are added into these buffers
    block by block instead of into fresh zeros, so a caller summing many blocks (a ring's running dq and the
    dK/dV accumulators that travel with K/V) holds one set of buffers, updated in place.
    """
    B, T, Hq, D = q.shape
    S = k.shape[1]
    delta = jnp.einsum("bthd,bthd->bht", out.astype(jnp.float32), dout.astype(jnp.float32))
    if dlse is not None:
        delta = delta - dlse.astype(jnp.float32)
    Hkv = k.shape[2]
    rep = Hq // Hkv
    q, k, v, q_index, kv_index, q_seg, kv_seg = _prepare(q, k, v, q_index, kv_index, q_seg, kv_seg, bq, bk)
    Tp, Sp = q.shape[1], k.shape[1]
    do = masks.pad_tokens(dout.astype(q.dtype), Tp, 1)
    # rows without keys have lse -inf: give them +inf so exp(s - lse) = 0 instead of NaN
    lse = masks.pad_tokens(jnp.where(jnp.isfinite(lse), lse, jnp.inf), Tp, 2)
    delta = masks.pad_tokens(delta, Tp, 2)
    kind, need = _pair_kinds(q_index, kv_index, q_seg, kv_seg, bq, bk, causal, sliding_window)
    lo, hi = masks.needed_span(need.T)
    if grads_into is None:
        grads_into = (jnp.zeros(dout.shape, jnp.float32), jnp.zeros((B, S) + k.shape[2:], jnp.float32),
                      jnp.zeros((B, S) + k.shape[2:], jnp.float32))
    dq_acc, dk_acc, dv_acc = (masks.pad_tokens(g.astype(jnp.float32), n, 1)
                              for g, n in zip(grads_into, (Tp, Sp, Sp)))
    rows = rep * bq
    to_rows, from_rows = _row_views(B, bq, Hkv, rep, D)

    def kv_block(j, accs):
        dq_acc, dk_acc, dv_acc = accs
        kj = lax.dynamic_slice_in_dim(k, j * bk, bk, axis=1)
        vj = lax.dynamic_slice_in_dim(v, j * bk, bk, axis=1)
        kj_idx = lax.dynamic_slice_in_dim(kv_index, j * bk, bk, axis=1)
        kj_seg = lax.dynamic_slice_in_dim(kv_seg, j * bk, bk, axis=1)

        def grad_pair(masked, i, dk, dv):
            """(dq of query block i, dK, dV + this pair's); rows = (query head, token) per kv head, as forward."""
            qi = to_rows(lax.dynamic_slice_in_dim(q, i * bq, bq, axis=1))
            doi = to_rows(lax.dynamic_slice_in_dim(do, i * bq, bq, axis=1))
            lse_i = lax.dynamic_slice_in_dim(lse, i * bq, bq, axis=2).reshape(B, Hkv, rows)
            delta_i = lax.dynamic_slice_in_dim(delta, i * bq, bq, axis=2).reshape(B, Hkv, rows)
            s = jnp.einsum("bgqd,bkgd->bgqk", qi, kj, preferred_element_type=jnp.float32) * scale
            p = jnp.exp(s - lse_i[..., None])
            if masked:
                mask = _block_mask(lax.dynamic_slice_in_dim(q_index, i * bq, bq, axis=1),
                                   lax.dynamic_slice_in_dim(q_seg, i * bq, bq, axis=1), kj_idx, kj_seg, causal,
                                   sliding_window)
                p = jnp.where(mask, p.reshape(B, Hkv, rep, bq, bk), 0.0).reshape(p.shape)
            dv = dv + jnp.einsum("bgqk,bgqd->bkgd", p.astype(doi.dtype), doi, preferred_element_type=jnp.float32)
            dp = jnp.einsum("bgqd,bkgd->bgqk", doi, vj, preferred_element_type=jnp.float32)
            ds = p * (dp - delta_i[..., None]) * scale
            dk = dk + jnp.einsum("bgqk,bgqd->bkgd", ds.astype(qi.dtype), qi, preferred_element_type=jnp.float32)
            dq_i = jnp.einsum("bgqk,bkgd->bgqd", ds.astype(kj.dtype), kj, preferred_element_type=jnp.float32)
            return from_rows(dq_i), dk, dv

        def skip(i, dk, dv):
            return jnp.zeros((B, bq, Hq, D), jnp.float32), dk, dv

        # indexed by SKIP, MASKED, FULL
        branches = (skip, functools.partial(grad_pair, True), functools.partial(grad_pair, False))

        def maybe_grad(i, carry):
            # the branches return block-sized values only; dq's full buffer is updated out here, in place (a
            # branch that wrote it would make XLA copy the whole buffer at every block pair)
            dq_acc, dk, dv = carry
            dq_i, dk, dv = lax.switch(kind[i, j], branches, i, dk, dv)
            dq_acc = lax.dynamic_update_slice_in_dim(
                dq_acc, lax.dynamic_slice_in_dim(dq_acc, i * bq, bq, axis=1) + dq_i, i * bq, axis=1)
            return dq_acc, dk, dv

        # this key block's dK/dV gather in a block-sized carry and go back into the full accumulators once
        dk_j = lax.dynamic_slice_in_dim(dk_acc, j * bk, bk, axis=1)
        dv_j = lax.dynamic_slice_in_dim(dv_acc, j * bk, bk, axis=1)
        dq_acc, dk_j, dv_j = lax.fori_loop(lo[j], hi[j], maybe_grad, (dq_acc, dk_j, dv_j))
        return (dq_acc, lax.dynamic_update_slice_in_dim(dk_acc, dk_j, j * bk, axis=1),
                lax.dynamic_update_slice_in_dim(dv_acc, dv_j, j * bk, axis=1))

    dq, dk, dv = lax.fori_loop(0, Sp // bk, kv_block, (dq_acc, dk_acc, dv_acc))
    return dq[:, :T], dk[:, :S], dv[:, :S]


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _flash(q, k, v, q_index, kv_index, q_seg, kv_seg, static):
    return _forward(q, k, v, q_index, kv_index, q_seg, kv_seg, **static.forward_kwargs())


def _flash_fwd(q, k, v, q_index, kv_index, q_seg, kv_seg, static):
    out, lse = _forward(q, k, v, q_index, kv_index, q_seg, kv_seg, **static.forward_kwargs())
    return (out, lse), (q, k, v, q_index, kv_index, q_seg, kv_seg, out, lse)


def _flash_bwd(static, residuals, cotangents):
    q, k, v, q_index, kv_index, q_seg, kv_seg, out, lse = residuals
    dout, dlse = cotangents
    dq, dk, dv = _backward(q, k, v, out, lse, dout, q_index, kv_index, q_seg, kv_seg, dlse=dlse,
                           **static.backward_kwargs())
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


class _Static(tuple):
    """Hashable static settings of one call: the mask, the scale, and the forward and backward block sizes."""
    _fields = ("causal", "sliding_window", "scale", "bq", "bk", "bq_bwd", "bk_bwd")

    def __new__(cls, **kw):
        return super().__new__(cls, tuple(kw[f] for f in cls._fields))

    def _mask_and_scale(self):
        return dict(causal=self[0], sliding_window=self[1], scale=self[2])

    def forward_kwargs(self):
        return dict(self._mask_and_scale(), bq=self[3], bk=self[4])

    def backward_kwargs(self):
        return dict(self._mask_and_scale(), bq=self[5], bk=self[6])


def _static(q, k, q_seg, kv_seg, causal, sliding_window, scale, blocks):
    """(q_seg, kv_seg, _Static) with the defaults filled in; `blocks` = (block_q, block_k, block_q_bwd,
    block_k_bwd), each None for its default."""
    B, T = q.shape[:2]
    S = k.shape[1]
    q_seg = jnp.ones((B, T), jnp.int32) if q_seg is None else q_seg.astype(jnp.int32)
    kv_seg = jnp.ones((B, S), jnp.int32) if kv_seg is None else kv_seg.astype(jnp.int32)
    scale = float(q.shape[-1] ** -0.5 if scale is None else scale)
    bq, bk, bq_bwd, bk_bwd = _block_sizes(T, S, *blocks)
    return q_seg, kv_seg, _Static(causal=bool(causal), sliding_window=sliding_window, scale=scale, bq=bq, bk=bk,
                                  bq_bwd=bq_bwd, bk_bwd=bk_bwd)


def flash_attention_block(q, k, v, *, q_index, kv_index, q_segment_ids=None, kv_segment_ids=None, causal=True,
                          sliding_window=None, scale=None, block_q=None, block_k=None, block_q_bwd=None,
                          block_k_bwd=None, merge_into=None):
    """(out fp32 [B,T,Hq,D], lse fp32 [B,Hq,T]) of q against keys at GLOBAL indices; differentiable in both.

    With `merge_into` (a partial (out, lse) over other keys) it returns the merge, computed in place; that form is
    for callers with their own VJP (the ring strategies' forward) and is not differentiable."""
    q_seg, kv_seg, static = _static(q, k, q_segment_ids, kv_segment_ids, causal, sliding_window, scale,
                                    (block_q, block_k, block_q_bwd, block_k_bwd))
    q_index, kv_index = q_index.astype(jnp.int32), kv_index.astype(jnp.int32)
    if merge_into is not None:
        return _forward(q, k, v, q_index, kv_index, q_seg, kv_seg, merge_into=merge_into, **static.forward_kwargs())
    return _flash(q, k, v, q_index, kv_index, q_seg, kv_seg, static)


def flash_attention_block_bwd(q, k, v, out, lse, dout, *, q_index, kv_index, q_segment_ids=None,
                              kv_segment_ids=None, causal=True, sliding_window=None, scale=None, block_q=None,
                              block_k=None, block_q_bwd=None, block_k_bwd=None, grads_into=None):
    """(dq, dk, dv) fp32 of one key block given the GLOBAL out and lse, so per-block gradients sum exactly; added
    to `grads_into` (fp32 (dq, dk, dv)) block by block when given."""
    q_seg, kv_seg, static = _static(q, k, q_segment_ids, kv_segment_ids, causal, sliding_window, scale,
                                    (block_q, block_k, block_q_bwd, block_k_bwd))
    return _backward(q, k, v, out, lse, dout, q_index.astype(jnp.int32), kv_index.astype(jnp.int32), q_seg, kv_seg,
                     grads_into=grads_into, **static.backward_kwargs())


def flash_attention(q, k, v, *, segment_ids=None, causal=True, sliding_window=None, scale=None, return_lse=False,
                    block_q=None, block_k=None, block_q_bwd=None, block_k_bwd=None):
    """Self-attention (queries bottom-right aligned to keys when T != S); out in q.dtype (, lse fp32 [B,Hq,T])."""
    B, T = q.shape[:2]
    q_index, kv_index = masks.self_attention_indices(B, T, k.shape[1])
    out, lse = flash_attention_block(q, k, v, q_index=q_index, kv_index=kv_index, q_segment_ids=segment_ids,
                                     kv_segment_ids=segment_ids, causal=causal, sliding_window=sliding_window,
                                     scale=scale, block_q=block_q, block_k=block_k, block_q_bwd=block_q_bwd,
                                     block_k_bwd=block_k_bwd)
    out = out.astype(q.dtype)
    return (out, lse) if return_lse else out
