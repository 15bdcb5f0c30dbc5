"""Block decomposition shared by the chunked lightning kernels (xla and pallas): padding and per-token decays.

Convention (HF MiniMax, see reference.py): S_t = lambda S_{t-1} + k_t v_t^T, o_t = q_t^T S_t, lambda = exp(-slope).
Split the (padded) sequence into blocks of C tokens; token t = n*C + i. With S_{n-1} the state at the last token
of block n-1 (S_{-1} = initial_state), every chunked kernel computes

    O_n = ((Q_n K_n^T) * D_n) V_n  +  q_decay_n * (Q_n S_{n-1})                 intra + inter
    S_n = state_decay_n * S_{n-1}  +  (K_n * k_decay_n)^T V_n                     state at block n's last token

where, with r_t the index of the run of equal segment ids token t is in and live_t = (segment_id_t != 0):
    D_n[i, j]      = lambda^(i-j)   if j <= i, r_i == r_j and live_i, else 0     (intra decay mask)
    q_decay[t]     = lambda^(i+1)   if live_t and r_t == r(previous block's last token)      (run 0 for block 0)
    k_decay[t]     = lambda^(e_n-i) if live_t and r_t == r(e_n);   e_n = the block's last REAL token (local index)
    state_decay_n  = lambda^(e_n+1) if live(e_n) and r(e_n) == r(previous block's last token)
The last block may hang past T (padding up to a multiple of C): its end e_n is the last real token, so the
returned S is the state at token T-1 exactly, whatever the padding. Every exponent is masked to 0 *before*
`exp`, so no -inf (or overflowing lambda^(-x)) is ever formed, and nothing here is differentiated (the slope is
a constant of the kernels).
"""
from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp

from longtrain.kernels.lightning.reference import run_ids


class BlockDecays(NamedTuple):
    """Per-token decay factors of a padded sequence of `num_blocks * block_size` tokens (all in `dtype`)."""

    runs_BT: jnp.ndarray          # int32 [B,Tp] run index of each token (padding tokens included)
    live_BT: jnp.ndarray          # bool  [B,Tp] token is a real, non-padding token
    q_decay_BHT: jnp.ndarray      # [B,H,Tp] weight of the carried state in a token's output
    k_decay_BHT: jnp.ndarray      # [B,H,Tp] weight of a token's k v^T in its block-end state
    state_decay_BHN: jnp.ndarray  # [B,H,N]  weight of the carried state in the block-end state


def num_blocks(T: int, block_size: int) -> int:
    return -(-T // block_size)


def pad_tokens(x, Tp: int, axis: int = 1):
    """Zero-pad axis `axis` of x up to length Tp."""
    pad = Tp - x.shape[axis]
    if pad == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, pad)
    return jnp.pad(x, widths)


def block_decays(segment_ids_BT, slope_H, T: int, block_size: int, dtype) -> BlockDecays:
    """The masks and decays of the module docstring for a [B,T] segment-id array (None = one document)."""
    C = block_size
    N = num_blocks(T, C)
    Tp = N * C
    if segment_ids_BT is None:
        raise ValueError("block_decays needs segment_ids; pass jnp.ones((B, T), int32) for one document")
    B = segment_ids_BT.shape[0]
    seg = pad_tokens(segment_ids_BT.astype(jnp.int32), Tp)  # padding tokens get segment 0
    runs = run_ids(seg)  # [B,Tp]
    live = seg != 0
    slope = slope_H.astype(dtype)

    local_i = jnp.arange(C, dtype=jnp.int32)  # [C]
    last_local = jnp.full((N,), C - 1, jnp.int32).at[N - 1].set((T - 1) - (N - 1) * C)  # e_n, [N]
    end_token = jnp.arange(N, dtype=jnp.int32) * C + last_local  # global index of e_n, [N]

    runs_BNC = runs.reshape(B, N, C)
    live_BNC = live.reshape(B, N, C)
    end_run_BN = runs[:, end_token]  # [B,N]
    end_live_BN = live[:, end_token]
    prev_run_BN = jnp.concatenate([jnp.zeros((B, 1), jnp.int32), end_run_BN[:, :-1]], axis=1)

    gets_state = live_BNC & (runs_BNC == prev_run_BN[:, :, None])  # [B,N,C]
    q_exp = jnp.where(gets_state, local_i + 1, 0).astype(dtype)
    q_decay = jnp.where(gets_state[:, None], jnp.exp(-slope[None, :, None, None] * q_exp[:, None]), 0.0)

    in_end_run = live_BNC & (runs_BNC == end_run_BN[:, :, None])  # implies local_i <= e_n
    k_exp = jnp.where(in_end_run, last_local[None, :, None] - local_i, 0).astype(dtype)
    k_decay = jnp.where(in_end_run[:, None], jnp.exp(-slope[None, :, None, None] * k_exp[:, None]), 0.0)

    carries = end_live_BN & (end_run_BN == prev_run_BN)  # [B,N]
    s_exp = (last_local + 1).astype(dtype)  # [N]
    state_decay = jnp.where(carries[:, None, :], jnp.exp(-slope[None, :, None] * s_exp[None, None, :]), 0.0)

    return BlockDecays(runs_BT=runs, live_BT=live, q_decay_BHT=q_decay.reshape(B, -1, Tp),
                       k_decay_BHT=k_decay.reshape(B, -1, Tp), state_decay_BHN=state_decay)


def intra_decay_mask(runs_BNC, live_BNC, slope_H, dtype):
    """D_n of the module docstring, [B,H,N,C,C] (fp `dtype`): lambda^(i-j) on same-run causal pairs, else 0."""
    C = runs_BNC.shape[-1]
    i = jnp.arange(C)
    diff = i[:, None] - i[None, :]
    same = (diff >= 0) & (runs_BNC[..., :, None] == runs_BNC[..., None, :]) & live_BNC[..., :, None]  # [B,N,C,C]
    base = jnp.exp(-slope_H.astype(dtype)[:, None, None] * jnp.maximum(diff, 0).astype(dtype))  # [H,C,C]
    return jnp.where(same[:, None], base[None, :, None], 0.0)
