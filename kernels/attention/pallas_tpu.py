"""TPU path of impl='pallas': a wrapper around jax's splash attention (Mosaic TPU kernels, fwd + dq + dkv).

Splash takes [heads, T, D] per batch row, static masks (causal / local window) with precomputed block sparsity,
and `SegmentIds` for packed documents. We adapt our contract to it:
- GQA without repeating K/V: the MQA kernel (q [rep, T, D] against one k/v head) vmapped over kv heads and batch.
- scale: splash does not scale logits, so q is multiplied by `scale` first (differentiable).
- any T: tokens are padded to a block multiple with segment 0; head_dim is zero-padded to a multiple of 128.
- padding (segment 0) queries see padding keys inside splash (splash requires no all-masked rows), and their
  outputs are zeroed here, so the contract "segment 0 gives output 0" holds.
Cases splash cannot serve raise NotImplementedError naming the case: return_lse, T != S, and the block-level
entries with dynamic global indices (use impl='xla' for those).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as splash_mask

from longtrain.kernels.attention import masks

_LANES = 128


def _unsupported(case):
    raise NotImplementedError(f"impl='pallas' on TPU (splash attention) cannot serve {case}; use impl='xla'")


@functools.lru_cache(maxsize=32)
def _kernel(T, rep, causal, sliding_window, block, interpret):
    """A splash MQA kernel for q [rep, T, D] against k/v [T, D]; built once per static shape and mask."""
    shape = (T, T)
    if sliding_window is not None:
        left = sliding_window - 1
        head_mask = splash_mask.LocalMask(shape, window_size=(left, 0 if causal else left), offset=0)
    elif causal:
        head_mask = splash_mask.CausalMask(shape)
    else:
        head_mask = splash_mask.FullMask(shape)
    block_sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                                    block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block,
                                    block_kv_dq=block)
    return splash.make_splash_mqa_single_device(splash_mask.MultiHeadMask([head_mask] * rep),
                                                block_sizes=block_sizes, interpret=interpret)


def attention(q, k, v, *, segment_ids=None, causal=True, sliding_window=None, scale=None, return_lse=False,
              block_q=None, block_k=None, interpret=False, backend=None, **unused_gpu_kwargs):
    """out [B,T,Hq,D] in q.dtype via splash attention; see the module docstring for what is adapted."""
    del backend, unused_gpu_kwargs  # Triton-only knobs (warps, stages, backward blocks) mean nothing here
    if return_lse:
        _unsupported("return_lse=True (splash keeps its log-sum-exp internal)")
    B, T, Hq, D = q.shape
    if k.shape[1] != T:
        _unsupported(f"queries and keys of different lengths (T={T}, S={k.shape[1]})")
    if block_q is not None and block_k is not None and block_q != block_k:
        _unsupported(f"different block_q={block_q} and block_k={block_k}")
    block = block_q or block_k or (512 if T >= 4096 else _LANES)
    if block % _LANES:
        raise ValueError(f"block_q/block_k={block} must be a multiple of {_LANES} on TPU")
    Hkv = k.shape[2]
    rep = Hq // Hkv
    scale = D ** -0.5 if scale is None else scale
    Tp, Dp = masks.round_up(T, block), masks.round_up(D, _LANES)
    seg = jnp.ones((B, T), jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32)
    seg = masks.pad_tokens(seg, Tp, 1)

    def to_heads(x):  # [B, T, H, D] -> [B, H, Tp, Dp]
        return jnp.swapaxes(masks.pad_tokens(masks.pad_tokens(x, Tp, 1), Dp, 3), 1, 2)

    q_g = to_heads(q * jnp.asarray(scale, q.dtype)).reshape(B, Hkv, rep, Tp, Dp)
    kernel = _kernel(Tp, rep, bool(causal), sliding_window, block, bool(interpret))

    def one_group(q_rTD, k_TD, v_TD, seg_T):
        return kernel(q_rTD, k_TD, v_TD, segment_ids=splash.SegmentIds(q=seg_T, kv=seg_T))

    per_group = jax.vmap(one_group, in_axes=(0, 0, 0, None))
    out = jax.vmap(per_group)(q_g, to_heads(k), to_heads(v), seg)  # [B, Hkv, rep, Tp, Dp]
    out = jnp.swapaxes(out.reshape(B, Hq, Tp, Dp), 1, 2)[:, :T, :, :D]
    return jnp.where((seg[:, :T] != 0)[:, :, None, None], out, 0).astype(q.dtype)


def attention_block(*args, **kwargs):
    _unsupported("attention_block (dynamic global token indices; splash masks are static)")


def attention_block_bwd(*args, **kwargs):
    _unsupported("attention_block_bwd (dynamic global token indices; splash masks are static)")
