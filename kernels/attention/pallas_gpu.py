"""Flash attention as Pallas Triton kernels (GPU): forward, dq and dk/dv kernels under one custom VJP.

Kernels (written in the subset that both Triton and interpret mode accept: refs + `pl.ds`, `fori_loop`,
`dot_general`, `where`/`exp`; no value slicing, power-of-two blocks):
- forward: grid (q blocks, B, Hq); loops over the key blocks in a per-(batch, q block) span computed outside
  from per-block index/segment ranges (causal, sliding window and packed documents skip whole blocks); saves
  out and lse [B,Hq,T] fp32.
- dq: grid (q blocks, B, Hq), the same span. dk/dv: grid (kv blocks, B, Hkv), loops over the rep query heads of
  its group and over the query blocks that can see the key block, so GQA never repeats K/V and no atomics.
The head dim is zero-padded to a power of two and tokens to a block multiple (padding gets segment 0); both
are cut off again outside the custom VJP, so autodiff of the pad is plain slicing.
Masked logits use a finite -1e30 (Triton-safe), and probabilities are `where`-masked so fully masked rows give
out 0 / lse -inf, never NaN.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from longtrain.kernels.attention import masks

_NEG = -1e30
_SQ = pl.squeezed  # a block dimension of size 1 that the kernel does not see
_NT = (((1,), (1,)), ((), ()))  # a @ b.T
_TN = (((0,), (0,)), ((), ()))  # a.T @ b


class Config(NamedTuple):
    causal: bool
    sliding_window: int | None
    scale: float
    bq: int
    bk: int
    bq_bwd: int
    bk_bwd: int
    num_warps: int
    num_stages: int
    interpret: bool


def _pow2(n):
    return 1 << max(int(n) - 1, 0).bit_length()


def _check_block(name, b):
    if b < 16 or b & (b - 1):
        raise ValueError(f"{name}={b} must be a power of two >= 16 (Triton block rule)")


def _flat_span(need_BNM):
    """Per-row spans of [B, n, m] flattened to int32 [pow2 >= B*n] (Triton loads power-of-two blocks)."""
    lo, hi = masks.needed_span(need_BNM)
    size = _pow2(lo.size)
    return masks.pad_tokens(lo.reshape(-1), size, 0), masks.pad_tokens(hi.reshape(-1), size, 0)


def _spans(q_index, kv_index, q_seg, kv_seg, bq, bk, cfg, transpose=False):
    need = masks.block_pairs_needed(masks.block_ranges(q_index, q_seg, bq), masks.block_ranges(kv_index, kv_seg, bk),
                                    cfg.causal, cfg.sliding_window, per_batch=True)
    return _flat_span(jnp.swapaxes(need, 1, 2) if transpose else need)


def _mask(qidx, qseg, kidx, kseg, cfg):
    return masks.visible(qidx[:, None], kidx[None, :], qseg[:, None], kseg[None, :], cfg.causal, cfg.sliding_window)


def _fwd_kernel(lo_ref, hi_ref, q_ref, k_ref, v_ref, qidx_ref, qseg_ref, kidx_ref, kseg_ref, o_ref, lse_ref, *,
                cfg, nq):
    i, b = pl.program_id(0), pl.program_id(1)
    bq, bk = cfg.bq, cfg.bk
    q, qidx, qseg = q_ref[...], qidx_ref[...], qseg_ref[...]

    def body(j, carry):
        m, l, acc = carry
        start = pl.multiple_of(j * bk, bk)
        kj, vj = k_ref[pl.ds(start, bk), :], v_ref[pl.ds(start, bk), :]
        mask = _mask(qidx, qseg, kidx_ref[pl.ds(start, bk)], kseg_ref[pl.ds(start, bk)], cfg)
        s = jnp.where(mask, lax.dot_general(q, kj, _NT, preferred_element_type=jnp.float32) * cfg.scale, _NEG)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        alpha = jnp.exp(m - m_new)
        p = jnp.where(mask, jnp.exp(s - m_new[:, None]), 0.0)
        pv = jnp.dot(p.astype(vj.dtype), vj, preferred_element_type=jnp.float32)
        return m_new, alpha * l + jnp.sum(p, axis=1), alpha[:, None] * acc + pv

    init = (jnp.full((bq,), _NEG, jnp.float32), jnp.zeros((bq,), jnp.float32),
            jnp.zeros((bq, q.shape[-1]), jnp.float32))
    m, l, acc = lax.fori_loop(lo_ref[b * nq + i], hi_ref[b * nq + i], body, init)
    seen = l > 0
    l_safe = jnp.where(seen, l, 1.0)
    o_ref[...] = (acc / l_safe[:, None]).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(seen, m + jnp.log(l_safe), -jnp.inf)


def _dq_kernel(lo_ref, hi_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qidx_ref, qseg_ref, kidx_ref,
               kseg_ref, dq_ref, *, cfg, nq):
    i, b = pl.program_id(0), pl.program_id(1)
    bk = cfg.bk_bwd
    q, do, lse, delta = q_ref[...], do_ref[...], lse_ref[...], delta_ref[...]
    qidx, qseg = qidx_ref[...], qseg_ref[...]

    def body(j, dq):
        start = pl.multiple_of(j * bk, bk)
        kj, vj = k_ref[pl.ds(start, bk), :], v_ref[pl.ds(start, bk), :]
        mask = _mask(qidx, qseg, kidx_ref[pl.ds(start, bk)], kseg_ref[pl.ds(start, bk)], cfg)
        s = lax.dot_general(q, kj, _NT, preferred_element_type=jnp.float32) * cfg.scale
        p = jnp.where(mask, jnp.exp(s - lse[:, None]), 0.0)
        dp = lax.dot_general(do, vj, _NT, preferred_element_type=jnp.float32)
        ds = p * (dp - delta[:, None])
        return dq + jnp.dot(ds.astype(kj.dtype), kj, preferred_element_type=jnp.float32)

    dq = lax.fori_loop(lo_ref[b * nq + i], hi_ref[b * nq + i], body, jnp.zeros(q.shape, jnp.float32))
    dq_ref[...] = (dq * cfg.scale).astype(dq_ref.dtype)


def _dkv_kernel(lo_ref, hi_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qidx_ref, qseg_ref, kidx_ref,
                kseg_ref, dk_ref, dv_ref, *, cfg, nk, rep):
    j, b, g = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    bq = cfg.bq_bwd
    kj, vj, kidx, kseg = k_ref[...], v_ref[...], kidx_ref[...], kseg_ref[...]
    lo, hi = lo_ref[b * nk + j], hi_ref[b * nk + j]

    def head(r, carry):
        h = g * rep + r

        def q_block(i, carry):
            dk, dv = carry
            start = pl.multiple_of(i * bq, bq)
            qi, doi = q_ref[h, pl.ds(start, bq), :], do_ref[h, pl.ds(start, bq), :]
            lse_i, delta_i = lse_ref[h, pl.ds(start, bq)], delta_ref[h, pl.ds(start, bq)]
            mask = _mask(qidx_ref[pl.ds(start, bq)], qseg_ref[pl.ds(start, bq)], kidx, kseg, cfg)
            s = lax.dot_general(qi, kj, _NT, preferred_element_type=jnp.float32) * cfg.scale
            p = jnp.where(mask, jnp.exp(s - lse_i[:, None]), 0.0)
            dv = dv + lax.dot_general(p.astype(doi.dtype), doi, _TN, preferred_element_type=jnp.float32)
            dp = lax.dot_general(doi, vj, _NT, preferred_element_type=jnp.float32)
            ds = p * (dp - delta_i[:, None])
            dk = dk + lax.dot_general(ds.astype(qi.dtype), qi, _TN, preferred_element_type=jnp.float32)
            return dk, dv

        return lax.fori_loop(lo, hi, q_block, carry)

    zeros = jnp.zeros(kj.shape, jnp.float32)
    dk, dv = lax.fori_loop(0, rep, head, (zeros, zeros))
    dk_ref[...] = (dk * cfg.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _call(kernel, grid, in_specs, out_specs, out_shape, cfg, name):
    return pl.pallas_call(kernel, grid=grid, in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
                          interpret=cfg.interpret, name=name,
                          compiler_params=pltriton.CompilerParams(num_warps=cfg.num_warps,
                                                                  num_stages=cfg.num_stages))


def _whole(n):
    return pl.BlockSpec((n,), lambda *_: (0,))


def _forward(q, k, v, q_index, kv_index, q_seg, kv_seg, cfg):
    """Padded inputs -> (out fp32 [B,Tp,Hq,Dp], lse fp32 [B,Hq,Tp])."""
    B, Tp, Hq, Dp = q.shape
    Sp, Hkv = k.shape[1], k.shape[2]
    rep, nq = Hq // Hkv, Tp // cfg.bq
    lo, hi = _spans(q_index, kv_index, q_seg, kv_seg, cfg.bq, cfg.bk, cfg)
    in_specs = [_whole(lo.size), _whole(hi.size),
                pl.BlockSpec((_SQ, cfg.bq, _SQ, Dp), lambda i, b, h: (b, i, h, 0)),
                pl.BlockSpec((_SQ, Sp, _SQ, Dp), lambda i, b, h: (b, 0, h // rep, 0)),
                pl.BlockSpec((_SQ, Sp, _SQ, Dp), lambda i, b, h: (b, 0, h // rep, 0)),
                pl.BlockSpec((_SQ, cfg.bq), lambda i, b, h: (b, i)),
                pl.BlockSpec((_SQ, cfg.bq), lambda i, b, h: (b, i)),
                pl.BlockSpec((_SQ, Sp), lambda i, b, h: (b, 0)),
                pl.BlockSpec((_SQ, Sp), lambda i, b, h: (b, 0))]
    out_specs = [pl.BlockSpec((_SQ, cfg.bq, _SQ, Dp), lambda i, b, h: (b, i, h, 0)),
                 pl.BlockSpec((_SQ, _SQ, cfg.bq), lambda i, b, h: (b, h, i))]
    out_shape = [jax.ShapeDtypeStruct(q.shape, jnp.float32), jax.ShapeDtypeStruct((B, Hq, Tp), jnp.float32)]
    kernel = functools.partial(_fwd_kernel, cfg=cfg, nq=nq)
    return _call(kernel, (nq, B, Hq), in_specs, out_specs, out_shape, cfg, "flash_fwd")(
        lo, hi, q, k, v, q_index, q_seg, kv_index, kv_seg)


def _backward(q, k, v, out, lse, dout, q_index, kv_index, q_seg, kv_seg, cfg, dlse=None):
    """Padded inputs -> (dq, dk, dv) fp32; out/lse are the GLOBAL ones (fully masked rows: lse -inf)."""
    B, Tp, Hq, Dp = q.shape
    Sp, Hkv = k.shape[1], k.shape[2]
    rep, bq, bk = Hq // Hkv, cfg.bq_bwd, cfg.bk_bwd
    nq, nk = Tp // bq, Sp // bk
    delta = jnp.einsum("bthd,bthd->bht", out.astype(jnp.float32), dout.astype(jnp.float32))
    if dlse is not None:
        delta = delta - dlse.astype(jnp.float32)
    lse = jnp.where(jnp.isfinite(lse), lse, jnp.inf)  # exp(s - inf) = 0 for rows without keys
    dout = dout.astype(q.dtype)
    common = (q_index, q_seg, kv_index, kv_seg)

    lo, hi = _spans(q_index, kv_index, q_seg, kv_seg, bq, bk, cfg)
    row_q = pl.BlockSpec((_SQ, bq, _SQ, Dp), lambda i, b, h: (b, i, h, 0))
    kv_all = pl.BlockSpec((_SQ, Sp, _SQ, Dp), lambda i, b, h: (b, 0, h // rep, 0))
    row_stat = pl.BlockSpec((_SQ, _SQ, bq), lambda i, b, h: (b, h, i))
    dq = _call(functools.partial(_dq_kernel, cfg=cfg, nq=nq), (nq, B, Hq),
               [_whole(lo.size), _whole(hi.size), row_q, kv_all, kv_all, row_q, row_stat, row_stat,
                pl.BlockSpec((_SQ, bq), lambda i, b, h: (b, i)), pl.BlockSpec((_SQ, bq), lambda i, b, h: (b, i)),
                pl.BlockSpec((_SQ, Sp), lambda i, b, h: (b, 0)), pl.BlockSpec((_SQ, Sp), lambda i, b, h: (b, 0))],
               row_q, jax.ShapeDtypeStruct(q.shape, jnp.float32), cfg, "flash_dq")(
        lo, hi, q, k, v, dout, lse, delta, *common)

    lo, hi = _spans(q_index, kv_index, q_seg, kv_seg, bq, bk, cfg, transpose=True)
    q_heads = jnp.swapaxes(q, 1, 2)  # [B, Hq, Tp, Dp]: the dk/dv kernel walks (head, q block) pairs
    do_heads = jnp.swapaxes(dout, 1, 2)
    q_all = pl.BlockSpec((_SQ, Hq, Tp, Dp), lambda j, b, g: (b, 0, 0, 0))
    stat_all = pl.BlockSpec((_SQ, Hq, Tp), lambda j, b, g: (b, 0, 0))
    kv_row = pl.BlockSpec((_SQ, bk, _SQ, Dp), lambda j, b, g: (b, j, g, 0))
    tok_all = pl.BlockSpec((_SQ, Tp), lambda j, b, g: (b, 0))
    tok_row = pl.BlockSpec((_SQ, bk), lambda j, b, g: (b, j))
    dk, dv = _call(functools.partial(_dkv_kernel, cfg=cfg, nk=nk, rep=rep), (nk, B, Hkv),
                   [_whole(lo.size), _whole(hi.size), q_all, kv_row, kv_row, q_all, stat_all, stat_all, tok_all,
                    tok_all, tok_row, tok_row],
                   [kv_row, kv_row], [jax.ShapeDtypeStruct(k.shape, jnp.float32)] * 2, cfg, "flash_dkv")(
        lo, hi, q_heads, k, v, do_heads, lse, delta, *common)
    return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _flash(q, k, v, q_index, kv_index, q_seg, kv_seg, cfg):
    return _forward(q, k, v, q_index, kv_index, q_seg, kv_seg, cfg)


def _flash_fwd(q, k, v, q_index, kv_index, q_seg, kv_seg, cfg):
    out, lse = _forward(q, k, v, q_index, kv_index, q_seg, kv_seg, cfg)
    return (out, lse), (q, k, v, q_index, kv_index, q_seg, kv_seg, out, lse)


def _flash_bwd(cfg, residuals, cotangents):
    q, k, v, q_index, kv_index, q_seg, kv_seg, out, lse = residuals
    dout, dlse = cotangents
    dq, dk, dv = _backward(q, k, v, out, lse, dout, q_index, kv_index, q_seg, kv_seg, cfg, dlse=dlse)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def _setup(q, k, q_index, kv_index, q_seg, kv_seg, scale, causal, sliding_window, block_q, block_k, block_q_bwd,
           block_k_bwd, num_warps, num_stages, interpret):
    """Config plus padded token arrays; tokens are padded to a multiple of every block size used."""
    B, T, _, D = q.shape
    S = k.shape[1]
    if D > 256:
        raise NotImplementedError(f"impl='pallas' supports head_dim <= 256; got head_dim={D}; use impl='xla'")
    big = D > 128  # smaller tiles keep q/k/v tiles of a 256-wide head inside shared memory
    blocks = {"block_q": block_q or (64 if big else 128), "block_k": block_k or (32 if big else 64),
              "block_q_bwd": block_q_bwd or (32 if big else 64), "block_k_bwd": block_k_bwd or (32 if big else 64)}
    for name, b in blocks.items():
        _check_block(name, b)
    # never larger than the (power-of-two rounded) sequence: small inputs keep small blocks
    bq, bq_bwd = (min(blocks[n], max(16, _pow2(T))) for n in ("block_q", "block_q_bwd"))
    bk, bk_bwd = (min(blocks[n], max(16, _pow2(S))) for n in ("block_k", "block_k_bwd"))
    cfg = Config(causal=bool(causal), sliding_window=sliding_window,
                 scale=float(D ** -0.5 if scale is None else scale), bq=bq, bk=bk, bq_bwd=bq_bwd, bk_bwd=bk_bwd,
                 num_warps=num_warps or (4 if D <= 64 else 8), num_stages=num_stages or 2,
                 interpret=bool(interpret))
    Tp, Sp = masks.round_up(T, max(bq, bq_bwd)), masks.round_up(S, max(bk, bk_bwd))
    q_seg = jnp.ones((B, T), jnp.int32) if q_seg is None else q_seg.astype(jnp.int32)
    kv_seg = jnp.ones((B, S), jnp.int32) if kv_seg is None else kv_seg.astype(jnp.int32)
    tokens = (masks.pad_tokens(q_index.astype(jnp.int32), Tp, 1, "edge"),
              masks.pad_tokens(kv_index.astype(jnp.int32), Sp, 1, "edge"),
              masks.pad_tokens(q_seg, Tp, 1), masks.pad_tokens(kv_seg, Sp, 1))
    return cfg, Tp, Sp, tokens


def _pad_qkv(x, n_to, d_to):
    x = masks.pad_tokens(x, n_to, 1)
    return masks.pad_tokens(x, d_to, 3)


def attention_block(q, k, v, *, q_index, kv_index, q_segment_ids=None, kv_segment_ids=None, causal=True,
                    sliding_window=None, scale=None, block_q=None, block_k=None, block_q_bwd=None, block_k_bwd=None,
                    num_warps=None, num_stages=None, interpret=False, backend=None):
    """(out fp32 [B,T,Hq,D], lse fp32 [B,Hq,T]) against keys at GLOBAL indices; differentiable in both."""
    del backend  # chosen by the dispatcher
    B, T, _, D = q.shape
    cfg, Tp, Sp, tokens = _setup(q, k, q_index, kv_index, q_segment_ids, kv_segment_ids, scale, causal,
                                 sliding_window, block_q, block_k, block_q_bwd, block_k_bwd, num_warps, num_stages,
                                 interpret)
    Dp = _pow2(max(D, 16))
    out, lse = _flash(_pad_qkv(q, Tp, Dp), _pad_qkv(k, Sp, Dp), _pad_qkv(v, Sp, Dp), *tokens, cfg)
    return out[:, :T, :, :D], lse[:, :, :T]


def attention_block_bwd(q, k, v, out, lse, dout, *, q_index, kv_index, q_segment_ids=None, kv_segment_ids=None,
                        causal=True, sliding_window=None, scale=None, block_q=None, block_k=None, block_q_bwd=None,
                        block_k_bwd=None, num_warps=None, num_stages=None, interpret=False, backend=None):
    """(dq, dk, dv) fp32 of one key block given the GLOBAL out and lse."""
    del backend
    B, T, _, D = q.shape
    S = k.shape[1]
    cfg, Tp, Sp, tokens = _setup(q, k, q_index, kv_index, q_segment_ids, kv_segment_ids, scale, causal,
                                 sliding_window, block_q, block_k, block_q_bwd, block_k_bwd, num_warps, num_stages,
                                 interpret)
    Dp = _pow2(max(D, 16))
    lse = masks.pad_tokens(lse.astype(jnp.float32), Tp, 2)
    dq, dk, dv = _backward(_pad_qkv(q, Tp, Dp), _pad_qkv(k, Sp, Dp), _pad_qkv(v, Sp, Dp), _pad_qkv(out, Tp, Dp),
                           lse, _pad_qkv(dout, Tp, Dp), *tokens, cfg)
    return dq[:, :T, :, :D], dk[:, :S, :, :D], dv[:, :S, :, :D]


def attention(q, k, v, *, segment_ids=None, causal=True, sliding_window=None, scale=None, return_lse=False,
              **kernel_kwargs):
    """Self-attention (queries bottom-right aligned when T != S); out in q.dtype (, lse fp32 [B,Hq,T])."""
    q_index, kv_index = masks.self_attention_indices(q.shape[0], q.shape[1], k.shape[1])
    out, lse = attention_block(q, k, v, q_index=q_index, kv_index=kv_index, q_segment_ids=segment_ids,
                               kv_segment_ids=segment_ids, causal=causal, sliding_window=sliding_window,
                               scale=scale, **kernel_kwargs)
    out = out.astype(q.dtype)
    return (out, lse) if return_lse else out
