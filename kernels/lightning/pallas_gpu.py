"""Lightning attention as Pallas GPU (Triton) kernels, forward and Lightning-2 backward, behind a custom VJP.

Grid (B, H, feature tiles): one program per batch row, head and tile of a head dimension, with the loop over
blocks of C tokens INSIDE the kernel (on Triton the grid runs in parallel, so a state carried across grid steps
would race) and the fp32 state tile in the loop carry (registers). The block math is chunking.py's; the
masks and decays are precomputed per token by `block_decays` (cheap XLA), so the kernels only load vectors:
no value slicing, no boolean reductions (both unsupported by the Triton lowering), power-of-two shapes.

Kernels (each recomputes what it needs, nothing [T,T] or per-block is stored):
  forward, tiles of Dv:  O_n = (Q K^T * D) V + q_decay * Q S;  S = a_n S + (K * k_decay)^T V
  dq, tiles of Dk:       dQ_n = (dO V^T * D) K + q_decay * dO S^T        (sweep 1, recomputes S)
  dk, tiles of Dk:       dK_n = (dO V^T * D)^T Q + k_decay * V dS^T;  dS = a_n dS + (Q * q_decay)^T dO   (reverse)
  dv, tiles of Dv:       dV_n = (Q K^T * D)^T dO + (K * k_decay) dS;   same reverse sweep; its final dS is
                         d initial_state
Head dims are zero-padded to a power of two >= 16 (MiniMax's 96 -> 128) and T to a multiple of C, inside.
The slope is not differentiated (zero cotangent).
"""
from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from longtrain.kernels.lightning.chunking import block_decays, num_blocks, pad_tokens

DEFAULT_TILE = 64  # width of the head-dim tile one program owns (state tile [Dk, 64] fp32 = 32 KiB at Dk=128)


def _pow2_at_least_16(n: int) -> int:
    return max(16, 1 << (n - 1).bit_length())


def _dot(a, b, contract, acc, exact):
    """2-D matmul contracting dim contract[0] of a with contract[1] of b, accumulated in acc.

    Operands of different dtypes (a bf16 block against the fp32 state) meet in acc. fp32 operands run at full
    precision (IEEE on Triton) when `exact` (fp32 inputs), else at the default TF32, which still keeps more
    bits than the bf16/fp16 inputs it is combined with."""
    if a.dtype != b.dtype:
        a, b = a.astype(acc), b.astype(acc)
    precision = lax.Precision.HIGHEST if (exact and a.dtype == jnp.float32) else None
    return lax.dot_general(a, b, (((contract[0],), (contract[1],)), ((), ())), precision=precision,
                           preferred_element_type=acc)


def _intra_decay(slope_ref, runs, live, C, acc_dtype):
    """[C,C] lambda^(i-j) on causal same-run pairs of live queries (exponent masked before exp)."""
    i = lax.broadcasted_iota(jnp.int32, (C, C), 0)
    j = lax.broadcasted_iota(jnp.int32, (C, C), 1)
    diff = i - j
    s = slope_ref[...].astype(acc_dtype)  # [C], every entry the head's slope
    same = (diff >= 0) & (runs[:, None] == runs[None, :]) & (live[:, None] != 0)
    return jnp.where(same, jnp.exp(-s[:, None] * jnp.where(same, diff, 0).astype(acc_dtype)), 0.0)


def _block_side(n, C, side_refs, acc):
    """Block n's token slice, its intra decay [C,C], q/k decays [C] and state-decay scalar (see chunking.py)."""
    runs_ref, live_ref, qd_ref, kd_ref, sd_ref, slope_ref = side_refs
    blk = pl.ds(pl.multiple_of(n * C, C), C)
    D = _intra_decay(slope_ref, runs_ref[blk], live_ref[blk], C, acc)
    a = jnp.max(sd_ref[blk].astype(acc))  # the block scalar, stored once per token (no scalar loads needed)
    return blk, D, qd_ref[blk].astype(acc), kd_ref[blk].astype(acc), a


def _fwd_kernel(q_ref, k_ref, v_ref, runs_ref, live_ref, qd_ref, kd_ref, sd_ref, slope_ref, s0_ref,
                o_ref, sN_ref, *, C, N, acc, exact):
    dot = partial(_dot, acc=acc, exact=exact)
    side_refs = (runs_ref, live_ref, qd_ref, kd_ref, sd_ref, slope_ref)

    def body(n, S):
        blk, D, qd, kd, a = _block_side(n, C, side_refs, acc)
        q, k, v = q_ref[blk, :], k_ref[blk, :], v_ref[blk, :]
        p = dot(q, k, (1, 1)) * D
        o = dot(p.astype(v.dtype), v, (1, 0)) + qd[:, None] * dot(q.astype(acc), S, (1, 0))
        o_ref[blk, :] = o.astype(o_ref.dtype)
        return a * S + dot(k.astype(acc) * kd[:, None], v.astype(acc), (0, 0))

    sN_ref[...] = lax.fori_loop(0, N, body, s0_ref[...].astype(acc)).astype(sN_ref.dtype)


def _dq_kernel(k_ref, v_ref, do_ref, runs_ref, live_ref, qd_ref, kd_ref, sd_ref, slope_ref, s0_ref,
               dq_ref, *, C, N, acc, exact):
    dot = partial(_dot, acc=acc, exact=exact)
    side_refs = (runs_ref, live_ref, qd_ref, kd_ref, sd_ref, slope_ref)

    def body(n, S):  # S: [Dk tile, Dv]
        blk, D, qd, kd, a = _block_side(n, C, side_refs, acc)
        k, v, do = k_ref[blk, :], v_ref[blk, :], do_ref[blk, :]
        dp = dot(do, v, (1, 1)) * D
        dq = dot(dp.astype(k.dtype), k, (1, 0)) + qd[:, None] * dot(do.astype(acc), S, (1, 1))
        dq_ref[blk, :] = dq.astype(dq_ref.dtype)
        return a * S + dot(k.astype(acc) * kd[:, None], v.astype(acc), (0, 0))

    lax.fori_loop(0, N, body, s0_ref[...].astype(acc))


def _dk_kernel(q_ref, v_ref, do_ref, runs_ref, live_ref, qd_ref, kd_ref, sd_ref, slope_ref, dsN_ref,
               dk_ref, *, C, N, acc, exact):
    dot = partial(_dot, acc=acc, exact=exact)
    side_refs = (runs_ref, live_ref, qd_ref, kd_ref, sd_ref, slope_ref)

    def body(it, dS):  # dS: [Dk tile, Dv], grad w.r.t. the state at block n's end
        n = N - 1 - it
        blk, D, qd, kd, a = _block_side(n, C, side_refs, acc)
        q, v, do = q_ref[blk, :], v_ref[blk, :], do_ref[blk, :]
        dp = dot(do, v, (1, 1)) * D
        dk = dot(dp.astype(q.dtype), q, (0, 0)) + kd[:, None] * dot(v.astype(acc), dS, (1, 1))
        dk_ref[blk, :] = dk.astype(dk_ref.dtype)
        return a * dS + dot(q.astype(acc) * qd[:, None], do.astype(acc), (0, 0))

    lax.fori_loop(0, N, body, dsN_ref[...].astype(acc))


def _dv_kernel(q_ref, k_ref, do_ref, runs_ref, live_ref, qd_ref, kd_ref, sd_ref, slope_ref, dsN_ref,
               dv_ref, ds0_ref, *, C, N, acc, exact):
    dot = partial(_dot, acc=acc, exact=exact)
    side_refs = (runs_ref, live_ref, qd_ref, kd_ref, sd_ref, slope_ref)

    def body(it, dS):  # dS: [Dk, Dv tile]
        n = N - 1 - it
        blk, D, qd, kd, a = _block_side(n, C, side_refs, acc)
        q, k, do = q_ref[blk, :], k_ref[blk, :], do_ref[blk, :]
        p = dot(q, k, (1, 1)) * D
        dv = dot(p.astype(do.dtype), do, (0, 0)) + dot(k.astype(acc) * kd[:, None], dS, (1, 0))
        dv_ref[blk, :] = dv.astype(dv_ref.dtype)
        return a * dS + dot(q.astype(acc) * qd[:, None], do.astype(acc), (0, 0))

    ds0_ref[...] = lax.fori_loop(0, N, body, dsN_ref[...].astype(acc)).astype(ds0_ref.dtype)


class _Specs:
    """BlockSpecs of the kernels' operands for grid (B, H, tile): one batch row and head per program."""

    def __init__(self, Tp, C):
        self.Tp, self.C = Tp, C

    def seq_full(self, D):  # [B,Tp,H,D] -> the whole sequence of one head, all of D
        return pl.BlockSpec((None, self.Tp, None, D), lambda b, h, t: (b, 0, h, 0))

    def seq_tile(self, Dt):  # [B,Tp,H,D] -> the whole sequence of one head, feature tile t
        return pl.BlockSpec((None, self.Tp, None, Dt), lambda b, h, t: (b, 0, h, t))

    def per_token(self):  # [B,Tp]
        return pl.BlockSpec((None, self.Tp), lambda b, h, t: (b, 0))

    def per_head_token(self):  # [B,H,Tp]
        return pl.BlockSpec((None, None, self.Tp), lambda b, h, t: (b, h, 0))

    def slope(self):  # [H,C]
        return pl.BlockSpec((None, self.C), lambda b, h, t: (h, 0))

    def state(self, rows, cols, tile_rows):  # [B,H,Dk,Dv] -> a tile of rows (tile_rows) or of columns
        if tile_rows:
            return pl.BlockSpec((None, None, rows, cols), lambda b, h, t: (b, h, t, 0))
        return pl.BlockSpec((None, None, rows, cols), lambda b, h, t: (b, h, 0, t))

    def side(self):  # runs, live, q_decay, k_decay, state_decay, slope
        return [self.per_token(), self.per_token(), self.per_head_token(), self.per_head_token(),
                self.per_head_token(), self.slope()]


def _side_inputs(slope, segment_ids, T, C, acc):
    """Per-token masks/decays for the kernels (see chunking.py), padded to Tp = N*C."""
    dec = block_decays(segment_ids, slope, T, C, acc)
    state_decay_BHT = jnp.repeat(dec.state_decay_BHN, C, axis=2)  # the block scalar, once per token
    slope_HC = jnp.broadcast_to(slope.astype(acc)[:, None], (slope.shape[0], C))
    return [dec.runs_BT, dec.live_BT.astype(jnp.int32), dec.q_decay_BHT, dec.k_decay_BHT, state_decay_BHT,
            slope_HC]


def _pad_heads(x, D):
    return x if x.shape[-1] == D else jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, D - x.shape[-1])])


def _geometry(q, v, block_size, tile):
    B, T, H, Dk = q.shape
    Dv = v.shape[-1]
    N = num_blocks(T, block_size)
    Dkp, Dvp = _pow2_at_least_16(Dk), _pow2_at_least_16(Dv)
    return B, T, H, Dk, Dv, N, N * block_size, Dkp, Dvp, min(tile, Dkp), min(tile, Dvp)


def _exact(q):
    """Full-precision fp32 matmuls for fp32/fp64 inputs; TF32 for the fp32 state dots of bf16/fp16 inputs."""
    return jnp.dtype(q.dtype).itemsize >= 4


def _params():
    return pltriton.CompilerParams(num_warps=4, num_stages=1)


def _forward(q, k, v, slope, segment_ids, s0, block_size, interpret, tile):
    B, T, H, Dk, Dv, N, Tp, Dkp, Dvp, tk, tv = _geometry(q, v, block_size, tile)
    acc = jnp.promote_types(q.dtype, jnp.float32)
    qp, kp = (_pad_heads(pad_tokens(x, Tp), Dkp) for x in (q, k))
    vp = _pad_heads(pad_tokens(v, Tp), Dvp)
    s0p = jnp.pad(s0.astype(acc), ((0, 0), (0, 0), (0, Dkp - Dk), (0, Dvp - Dv)))
    sp = _Specs(Tp, block_size)
    out, state = pl.pallas_call(
        partial(_fwd_kernel, C=block_size, N=N, acc=acc, exact=_exact(q)),
        grid=(B, H, Dvp // tv),
        in_specs=[sp.seq_full(Dkp), sp.seq_full(Dkp), sp.seq_tile(tv), *sp.side(), sp.state(Dkp, tv, False)],
        out_specs=[sp.seq_tile(tv), sp.state(Dkp, tv, False)],
        out_shape=[jax.ShapeDtypeStruct((B, Tp, H, Dvp), q.dtype), jax.ShapeDtypeStruct((B, H, Dkp, Dvp), acc)],
        compiler_params=_params(), interpret=interpret, name="lightning_fwd",
    )(qp, kp, vp, *_side_inputs(slope, segment_ids, T, block_size, acc), s0p)
    return out[:, :T, :, :Dv], state[:, :, :Dk, :Dv]


@partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8))
def lightning_pallas_core(q, k, v, slope, segment_ids, s0, block_size, interpret, tile):
    """(out [B,T,H,Dv] q.dtype, final state [B,H,Dk,Dv] fp32); segment_ids int32 [B,T]."""
    return _forward(q, k, v, slope, segment_ids, s0, block_size, interpret, tile)


def _core_fwd(q, k, v, slope, segment_ids, s0, block_size, interpret, tile):
    return (_forward(q, k, v, slope, segment_ids, s0, block_size, interpret, tile),
            (q, k, v, slope, segment_ids, s0))


def _core_bwd(block_size, interpret, tile, res, cotangents):
    q, k, v, slope, segment_ids, s0 = res
    dout, dstate = cotangents
    B, T, H, Dk, Dv, N, Tp, Dkp, Dvp, tk, tv = _geometry(q, v, block_size, tile)
    acc = jnp.promote_types(q.dtype, jnp.float32)
    qp, kp = (_pad_heads(pad_tokens(x, Tp), Dkp) for x in (q, k))
    vp = _pad_heads(pad_tokens(v, Tp), Dvp)
    dop = _pad_heads(pad_tokens(dout.astype(v.dtype), Tp), Dvp)
    pad_state = ((0, 0), (0, 0), (0, Dkp - Dk), (0, Dvp - Dv))
    s0p = jnp.pad(s0.astype(acc), pad_state)
    dsNp = jnp.pad(dstate.astype(acc), pad_state)
    side = _side_inputs(slope, segment_ids, T, block_size, acc)
    sp = _Specs(Tp, block_size)
    common = dict(compiler_params=_params(), interpret=interpret)
    kern = dict(C=block_size, N=N, acc=acc, exact=_exact(q))

    dq = pl.pallas_call(
        partial(_dq_kernel, **kern), grid=(B, H, Dkp // tk),
        in_specs=[sp.seq_tile(tk), sp.seq_full(Dvp), sp.seq_full(Dvp), *sp.side(), sp.state(tk, Dvp, True)],
        out_specs=sp.seq_tile(tk), out_shape=jax.ShapeDtypeStruct((B, Tp, H, Dkp), q.dtype),
        name="lightning_bwd_dq", **common,
    )(kp, vp, dop, *side, s0p)
    dk = pl.pallas_call(
        partial(_dk_kernel, **kern), grid=(B, H, Dkp // tk),
        in_specs=[sp.seq_tile(tk), sp.seq_full(Dvp), sp.seq_full(Dvp), *sp.side(), sp.state(tk, Dvp, True)],
        out_specs=sp.seq_tile(tk), out_shape=jax.ShapeDtypeStruct((B, Tp, H, Dkp), k.dtype),
        name="lightning_bwd_dk", **common,
    )(qp, vp, dop, *side, dsNp)
    dv, ds0 = pl.pallas_call(
        partial(_dv_kernel, **kern), grid=(B, H, Dvp // tv),
        in_specs=[sp.seq_full(Dkp), sp.seq_full(Dkp), sp.seq_tile(tv), *sp.side(), sp.state(Dkp, tv, False)],
        out_specs=[sp.seq_tile(tv), sp.state(Dkp, tv, False)],
        out_shape=[jax.ShapeDtypeStruct((B, Tp, H, Dvp), v.dtype), jax.ShapeDtypeStruct((B, H, Dkp, Dvp), acc)],
        name="lightning_bwd_dv", **common,
    )(qp, kp, dop, *side, dsNp)
    return (dq[:, :T, :, :Dk], dk[:, :T, :, :Dk], dv[:, :T, :, :Dv], jnp.zeros_like(slope), None,
            ds0[:, :, :Dk, :Dv].astype(s0.dtype))


lightning_pallas_core.defvjp(_core_fwd, _core_bwd)


def lightning_pallas(q, k, v, slope, *, segment_ids, initial_state, return_state, block_size, interpret=None,
                     tile=DEFAULT_TILE):
    """impl="pallas": arguments validated by api.py. interpret=True runs the Pallas interpreter (CPU tests);
    None means compiled, which needs a GPU."""
    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"block_size={block_size} is not supported by impl='pallas': Triton needs a power of two "
                         ">= 16 (use impl='xla' for other block sizes)")
    if tile < 16 or tile & (tile - 1):
        raise ValueError(f"tile={tile} must be a power of two >= 16")
    if interpret is None:
        if jax.default_backend() != "gpu":
            raise ValueError(f"impl='pallas' compiles for GPU only; this backend is {jax.default_backend()!r}. "
                             "Pass interpret=True to run the Pallas interpreter, or use impl='xla'.")
        interpret = False
    B, T, H, Dk = q.shape
    acc = jnp.promote_types(q.dtype, jnp.float32)
    s0 = jnp.zeros((B, H, Dk, v.shape[-1]), acc) if initial_state is None else initial_state
    out, state = lightning_pallas_core(q, k, v, slope, segment_ids, s0, block_size, bool(interpret), tile)
    return (out, state) if return_state else out
