"""Lightning attention as Pallas TPU (Mosaic) kernels, forward and Lightning-2 backward, behind a custom VJP.

TPU grids run as a sequential loop, so unlike the GPU kernel the block loop IS the grid: grid (B, H, N) with
the block axis "arbitrary", and the fp32 state [Dk, Dv] lives in a VMEM scratch that persists across it
(initialised from the initial state at block 0, written out at the last block). The backward has two kernels:
dq in block order (recomputing the state), and dk+dv in reverse block order (index maps n -> N-1-n) carrying
dS; its last step yields d initial_state. Same block math as chunking.py / pallas_gpu.py.

Mosaic wants the last two block dims divisible by (8, 128) or equal to the array's: inputs are laid out
[B,H,T,D] with D zero-padded to a multiple of 128, per-token vectors as columns [.., C, 1] (and the run ids
also as rows [.., 1, C] for the [C,C] same-document mask), the masked intra decay base lambda^(i-j) as [H,C,C].
block_size must be a multiple of 8. Reached through `lightning_attention(impl="pallas")` on a TPU backend.
"""
from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from longtrain.kernels.lightning.chunking import block_decays, num_blocks, pad_tokens


def _round_up(n, m):
    return -(-n // m) * m


def _dot(a, b, contract, acc):
    """2-D matmul contracting dim contract[0] of a with contract[1] of b, accumulated in acc. fp32 operands ask for
    HIGHEST precision: the TPU default would round them to one bf16 pass, too coarse for the carried state."""
    if a.dtype != b.dtype:
        a, b = a.astype(acc), b.astype(acc)
    precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    return lax.dot_general(a, b, (((contract[0],), (contract[1],)), ((), ())), precision=precision,
                           preferred_element_type=acc)


def _intra(rcol_ref, rrow_ref, lcol_ref, base_ref):
    """[C,C] intra decay: the causal base lambda^(i-j) kept on same-run pairs of live queries."""
    same = (rcol_ref[...] == rrow_ref[...]) & (lcol_ref[...] != 0)
    return jnp.where(same, base_ref[...], 0.0)


def _fwd_kernel(q_ref, k_ref, v_ref, rcol_ref, rrow_ref, lcol_ref, base_ref, qd_ref, kd_ref, sd_ref, s0_ref,
                o_ref, sN_ref, S_scr, *, N, acc):
    n = pl.program_id(2)

    @pl.when(n == 0)
    def _():
        S_scr[...] = s0_ref[...].astype(acc)

    q, k, v, S = q_ref[...], k_ref[...], v_ref[...], S_scr[...]
    p = _dot(q, k, (1, 1), acc) * _intra(rcol_ref, rrow_ref, lcol_ref, base_ref)
    o = _dot(p.astype(v.dtype), v, (1, 0), acc) + qd_ref[...] * _dot(q.astype(acc), S, (1, 0), acc)
    o_ref[...] = o.astype(o_ref.dtype)
    S = sd_ref[...] * S + _dot(k.astype(acc) * kd_ref[...], v.astype(acc), (0, 0), acc)
    S_scr[...] = S

    @pl.when(n == N - 1)
    def _():
        sN_ref[...] = S.astype(sN_ref.dtype)


def _dq_kernel(k_ref, v_ref, do_ref, rcol_ref, rrow_ref, lcol_ref, base_ref, qd_ref, kd_ref, sd_ref, s0_ref,
               dq_ref, S_scr, *, N, acc):
    n = pl.program_id(2)

    @pl.when(n == 0)
    def _():
        S_scr[...] = s0_ref[...].astype(acc)

    k, v, do, S = k_ref[...], v_ref[...], do_ref[...], S_scr[...]
    dp = _dot(do, v, (1, 1), acc) * _intra(rcol_ref, rrow_ref, lcol_ref, base_ref)
    dq = _dot(dp.astype(k.dtype), k, (1, 0), acc) + qd_ref[...] * _dot(do.astype(acc), S, (1, 1), acc)
    dq_ref[...] = dq.astype(dq_ref.dtype)
    S_scr[...] = sd_ref[...] * S + _dot(k.astype(acc) * kd_ref[...], v.astype(acc), (0, 0), acc)


def _dkdv_kernel(q_ref, k_ref, v_ref, do_ref, rcol_ref, rrow_ref, lcol_ref, base_ref, qd_ref, kd_ref, sd_ref,
                 dsN_ref, dk_ref, dv_ref, ds0_ref, dS_scr, *, N, acc):
    it = pl.program_id(2)  # block n = N-1-it (reverse sweep)

    @pl.when(it == 0)
    def _():
        dS_scr[...] = dsN_ref[...].astype(acc)

    q, k, v, do, dS = q_ref[...], k_ref[...], v_ref[...], do_ref[...], dS_scr[...]
    D = _intra(rcol_ref, rrow_ref, lcol_ref, base_ref)
    kd = kd_ref[...]
    dp = _dot(do, v, (1, 1), acc) * D
    p = _dot(q, k, (1, 1), acc) * D
    dk = _dot(dp.astype(q.dtype), q, (0, 0), acc) + kd * _dot(v.astype(acc), dS, (1, 1), acc)
    dv = _dot(p.astype(do.dtype), do, (0, 0), acc) + _dot(k.astype(acc) * kd, dS, (1, 0), acc)
    dk_ref[...] = dk.astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)
    dS = sd_ref[...] * dS + _dot(q.astype(acc) * qd_ref[...], do.astype(acc), (0, 0), acc)
    dS_scr[...] = dS

    @pl.when(it == N - 1)
    def _():
        ds0_ref[...] = dS.astype(ds0_ref.dtype)


class _Layout:
    """Padded [B,H,Tp,D] operands, side inputs and their BlockSpecs for grid (B, H, N) (reverse: n -> N-1-n)."""

    def __init__(self, q, v, slope, segment_ids, block_size, reverse=False):
        B, T, H, Dk = q.shape
        self.B, self.T, self.H, self.Dk, self.Dv = B, T, H, Dk, v.shape[-1]
        self.C, self.N = block_size, num_blocks(T, block_size)
        self.Tp = self.N * self.C
        self.Dkp, self.Dvp = _round_up(Dk, 128), _round_up(self.Dv, 128)
        self.acc = jnp.promote_types(q.dtype, jnp.float32)
        N, C = self.N, self.C
        self.blk = (lambda n: N - 1 - n) if reverse else (lambda n: n)
        dec = block_decays(segment_ids, slope, T, C, self.acc)
        i = jnp.arange(C)
        diff = i[:, None] - i[None, :]
        base = jnp.where(diff >= 0, jnp.exp(-slope.astype(self.acc)[:, None, None] * jnp.maximum(diff, 0)), 0.0)
        self.side = [dec.runs_BT[:, :, None], dec.runs_BT.reshape(B, N, 1, C), dec.live_BT.astype(jnp.int32)[..., None],
                     base, dec.q_decay_BHT[..., None], dec.k_decay_BHT[..., None],
                     dec.state_decay_BHN[..., None, None]]

    def operand(self, x_BTHD, D):
        """[B,T,H,d] -> zero-padded [B,H,Tp,D]."""
        x = pad_tokens(x_BTHD, self.Tp)
        x = jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, D - x.shape[-1])))
        return jnp.swapaxes(x, 1, 2)

    def unpad(self, x_BHTD, d):
        return jnp.swapaxes(x_BHTD, 1, 2)[:, :self.T, :, :d]

    def state(self, s_BHDE):
        return jnp.pad(s_BHDE.astype(self.acc), ((0, 0), (0, 0), (0, self.Dkp - self.Dk), (0, self.Dvp - self.Dv)))

    def seq_spec(self, D):
        return pl.BlockSpec((None, None, self.C, D), lambda b, h, n: (b, h, self.blk(n), 0))

    def state_spec(self):
        return pl.BlockSpec((None, None, self.Dkp, self.Dvp), lambda b, h, n: (b, h, 0, 0))

    def side_specs(self):
        C, blk = self.C, self.blk
        return [pl.BlockSpec((None, C, 1), lambda b, h, n: (b, blk(n), 0)),
                pl.BlockSpec((None, None, 1, C), lambda b, h, n: (b, blk(n), 0, 0)),
                pl.BlockSpec((None, C, 1), lambda b, h, n: (b, blk(n), 0)),
                pl.BlockSpec((None, C, C), lambda b, h, n: (h, 0, 0)),
                pl.BlockSpec((None, None, C, 1), lambda b, h, n: (b, h, blk(n), 0)),
                pl.BlockSpec((None, None, C, 1), lambda b, h, n: (b, h, blk(n), 0)),
                pl.BlockSpec((None, None, None, 1, 1), lambda b, h, n: (b, h, blk(n), 0, 0))]

    def call(self, kernel, in_specs, out_specs, out_shape, interpret, name):
        return pl.pallas_call(
            partial(kernel, N=self.N, acc=self.acc), grid=(self.B, self.H, self.N), in_specs=in_specs,
            out_specs=out_specs, out_shape=out_shape,
            scratch_shapes=[pltpu.VMEM((self.Dkp, self.Dvp), self.acc)],
            compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
            interpret=interpret, name=name)


def _forward(q, k, v, slope, segment_ids, s0, block_size, interpret):
    L = _Layout(q, v, slope, segment_ids, block_size)
    out, state = L.call(
        _fwd_kernel, [L.seq_spec(L.Dkp), L.seq_spec(L.Dkp), L.seq_spec(L.Dvp), *L.side_specs(), L.state_spec()],
        [L.seq_spec(L.Dvp), L.state_spec()],
        [jax.ShapeDtypeStruct((L.B, L.H, L.Tp, L.Dvp), q.dtype),
         jax.ShapeDtypeStruct((L.B, L.H, L.Dkp, L.Dvp), L.acc)], interpret, "lightning_tpu_fwd",
    )(L.operand(q, L.Dkp), L.operand(k, L.Dkp), L.operand(v, L.Dvp), *L.side, L.state(s0))
    return L.unpad(out, L.Dv), state[:, :, :L.Dk, :L.Dv]


@partial(jax.custom_vjp, nondiff_argnums=(6, 7))
def lightning_pallas_tpu_core(q, k, v, slope, segment_ids, s0, block_size, interpret):
    """(out [B,T,H,Dv] q.dtype, final state [B,H,Dk,Dv] fp32); segment_ids int32 [B,T]."""
    return _forward(q, k, v, slope, segment_ids, s0, block_size, interpret)


def _core_fwd(q, k, v, slope, segment_ids, s0, block_size, interpret):
    return _forward(q, k, v, slope, segment_ids, s0, block_size, interpret), (q, k, v, slope, segment_ids, s0)


def _core_bwd(block_size, interpret, res, cotangents):
    q, k, v, slope, segment_ids, s0 = res
    dout, dstate = cotangents
    F = _Layout(q, v, slope, segment_ids, block_size)
    R = _Layout(q, v, slope, segment_ids, block_size, reverse=True)
    qp, kp, vp = F.operand(q, F.Dkp), F.operand(k, F.Dkp), F.operand(v, F.Dvp)
    dop = F.operand(dout.astype(v.dtype), F.Dvp)
    dq = F.call(
        _dq_kernel, [F.seq_spec(F.Dkp), F.seq_spec(F.Dvp), F.seq_spec(F.Dvp), *F.side_specs(), F.state_spec()],
        F.seq_spec(F.Dkp), jax.ShapeDtypeStruct(qp.shape, q.dtype), interpret, "lightning_tpu_bwd_dq",
    )(kp, vp, dop, *F.side, F.state(s0))
    dk, dv, ds0 = R.call(
        _dkdv_kernel, [R.seq_spec(R.Dkp), R.seq_spec(R.Dkp), R.seq_spec(R.Dvp), R.seq_spec(R.Dvp), *R.side_specs(),
                       R.state_spec()],
        [R.seq_spec(R.Dkp), R.seq_spec(R.Dvp), R.state_spec()],
        [jax.ShapeDtypeStruct(kp.shape, k.dtype), jax.ShapeDtypeStruct(vp.shape, v.dtype),
         jax.ShapeDtypeStruct((R.B, R.H, R.Dkp, R.Dvp), R.acc)], interpret, "lightning_tpu_bwd_dkdv",
    )(qp, kp, vp, dop, *R.side, R.state(dstate))
    return (F.unpad(dq, F.Dk), F.unpad(dk, F.Dk), F.unpad(dv, F.Dv), jnp.zeros_like(slope), None,
            ds0[:, :, :F.Dk, :F.Dv].astype(s0.dtype))


lightning_pallas_tpu_core.defvjp(_core_fwd, _core_bwd)


def lightning_pallas_tpu(q, k, v, slope, *, segment_ids, initial_state, return_state, block_size, interpret=None):
    """The TPU kernel; arguments validated by api.py. interpret=True runs the Pallas interpreter (CPU tests)."""
    if block_size % 8:
        raise ValueError(f"block_size={block_size} is not supported by the TPU pallas kernel: it must be a "
                         "multiple of 8 (TPU sublane tiling)")
    B, T, H, Dk = q.shape
    acc = jnp.promote_types(q.dtype, jnp.float32)
    s0 = jnp.zeros((B, H, Dk, v.shape[-1]), acc) if initial_state is None else initial_state
    out, state = lightning_pallas_tpu_core(q, k, v, slope, segment_ids, s0, block_size, bool(interpret))
    return (out, state) if return_state else out
