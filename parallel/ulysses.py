"""`ulysses` context attention (DeepSpeed-Ulysses): all-to-all sequence <-> heads, full-sequence attention on
H/P heads per rank, all-to-all back. Needs Hq and Hkv divisible by P (checked by `context_attention`).

After the all-to-all a rank holds the whole sequence in layout order, so the block kernel gets the layout's
global indices and masks stay exact. The backward is the transpose of the all-to-alls around the block VJP
(which saves only out and lse). Bytes per rank per pass: (P-1)/P · n · (2h + 2h_kv) · b. With fewer kv heads
than ranks (GQA, P % Hkv == 0) each kv head is replicated P/Hkv times first (h_kv -> P·d in the formula).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from longtrain.parallel.blocks import Problem, local_attention_vjp


def seq_to_heads(x, axis_name, groups=None):
    """[B, n, H, D] (sequence shard) -> [B, g*n, H/g, D] (head shard) over the group of g ranks."""
    return jax.lax.all_to_all(x, axis_name, 2, 1, tiled=True, axis_index_groups=groups)


def heads_to_seq(x, axis_name, groups=None):
    """Inverse of `seq_to_heads`."""
    return jax.lax.all_to_all(x, axis_name, 1, 2, tiled=True, axis_index_groups=groups)


def ulysses_attention_local(pb: Problem, q, k, v, seg):
    ax, P = pb.axis_name, pb.context_size
    B = q.shape[0]
    idx = pb.indices_of_ranks(0, P, B)
    seg_all = None if seg is None else jax.lax.all_gather(seg, ax, axis=1, tiled=True)
    if k.shape[2] % P:  # fewer kv heads than ranks (GQA): replicate each kv head P/Hkv times, keeping q->kv map
        k, v = (jnp.repeat(x, P // x.shape[2], axis=2) for x in (k, v))
    qh, kh, vh = (seq_to_heads(x, ax) for x in (q, k, v))
    out = local_attention_vjp(pb)(qh, kh, vh, idx, idx, seg_all, seg_all)
    return heads_to_seq(out, ax)
