"""impl='cudnn': `jax.nn.dot_product_attention(implementation="cudnn")` (cuDNN flash attention, NVIDIA GPUs).

The public cuDNN API has no segment ids, no global token offsets and no right-side window when causal, so those
cases raise NotImplementedError naming the case instead of being silently ignored (MaxText #4476 shows what
happens otherwise). Cases are checked before the platform, so the errors are the same on every machine.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def _unsupported(case):
    raise NotImplementedError(f"impl='cudnn' cannot serve {case}; use impl='pallas' or impl='xla'")


def check_supported(q, k, *, segment_ids, causal, sliding_window, return_lse):
    if segment_ids is not None:
        _unsupported("segment_ids (cuDNN's public API has no packed-document mask)")
    if return_lse:
        _unsupported("return_lse=True")
    if q.dtype not in (jnp.bfloat16, jnp.float16):
        _unsupported(f"dtype {q.dtype} (cuDNN flash attention takes bfloat16 or float16)")
    D = q.shape[-1]
    if D > 256 or D % 8:
        _unsupported(f"head_dim={D} (cuDNN needs a multiple of 8, at most 256)")
    if causal and q.shape[1] != k.shape[1]:
        _unsupported(f"causal attention with T={q.shape[1]} != S={k.shape[1]} (different causal alignment)")
    if sliding_window is not None and not causal:
        _unsupported("a sliding window without causal (cuDNN windows are left-only)")


def attention(q, k, v, *, segment_ids=None, causal=True, sliding_window=None, scale=None, return_lse=False):
    """out [B,T,Hq,D] in q.dtype; GQA is native in jax.nn.dot_product_attention (Hq % Hkv == 0)."""
    check_supported(q, k, segment_ids=segment_ids, causal=causal, sliding_window=sliding_window,
                    return_lse=return_lse)
    platform = jax.devices()[0].platform
    if platform not in ("gpu", "cuda"):
        raise NotImplementedError(f"impl='cudnn' needs an NVIDIA GPU with cuDNN; this platform is {platform!r}; "
                                  "use impl='xla' (CPU) or impl='pallas'")
    window = None if sliding_window is None else (sliding_window - 1, 0)
    return jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=causal, local_window_size=window,
                                        implementation="cudnn")
