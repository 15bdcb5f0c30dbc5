"""Rotary position embedding with the scaling types of Hugging Face `rope_parameters`: none (default), linear,
dynamic (NTK), yarn, llama3, and partial rotary (only the first `rotary_dim` channels of each head rotate).

The frequencies follow `transformers.modeling_rope_utils` formula by formula, in fp32 like torch, so imported models
give the same logits. Positions come from the batch (`positions [B, T]`, restarting at 0 per packed document).

`dynamic` is the one data-dependent type: like `transformers`, its base grows with the longest sequence seen,
`seq_len = max(positions) + 1` over the batch (never below `max_position_embeddings`). `transformers` caches the grown
frequencies between calls; this implementation is stateless (every call uses its own batch), which equals a freshly
loaded HF model.
"""
from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np


def rotary_dim(config) -> int:
    """Number of rotated channels per head (`head_dim * partial_rotary_factor`, as `transformers` rounds it)."""
    return int(config.resolved_head_dim * config.partial_rotary_factor)


def _base_inv_freq(theta: float, dim: int) -> np.ndarray:
    # torch: 1 / (base ** (arange(0, dim, 2).float() / dim)) in fp32
    exponents = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    return (np.float32(1.0) / (np.float32(theta) ** exponents)).astype(np.float32)


def _original_max_positions(config) -> int:
    scaling = config.rope_scaling
    return scaling.original_max_position_embeddings or config.max_position_embeddings


def _yarn(config, dim: int) -> tuple[np.ndarray, float]:
    s = config.rope_scaling
    base, factor = config.rope_theta, s.factor
    original = _original_max_positions(config)

    def get_mscale(scale, mscale=1.0):
        return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0

    if s.attention_factor is not None:
        attention_factor = s.attention_factor
    elif s.mscale and s.mscale_all_dim:
        attention_factor = float(get_mscale(factor, s.mscale) / get_mscale(factor, s.mscale_all_dim))
    else:
        attention_factor = get_mscale(factor)

    def correction_dim(num_rotations):
        return (dim * math.log(original / (num_rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(s.beta_fast or 32), correction_dim(s.beta_slow or 1)
    if s.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # the same guard against a zero-width ramp as transformers
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1).astype(np.float32)
    extrapolation_weight = np.float32(1) - ramp
    pos_freqs = np.float32(base) ** (np.arange(0, dim, 2).astype(np.float32) / np.float32(dim))
    inv_extrapolation = np.float32(1.0) / pos_freqs
    inv_interpolation = np.float32(1.0) / (np.float32(factor) * pos_freqs)
    inv_freq = inv_interpolation * (1 - extrapolation_weight) + inv_extrapolation * extrapolation_weight
    return inv_freq.astype(np.float32), float(attention_factor)


def _llama3(config, dim: int) -> np.ndarray:
    s = config.rope_scaling
    inv_freq = _base_inv_freq(config.rope_theta, dim)
    old_context = _original_max_positions(config)
    low_wavelen = old_context / s.low_freq_factor
    high_wavelen = old_context / s.high_freq_factor
    wavelen = np.float32(2 * math.pi) / inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / np.float32(s.factor), inv_freq)
    smooth = (old_context / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    smoothed = (1 - smooth) * scaled / np.float32(s.factor) + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def static_inv_freq(config) -> tuple[np.ndarray, float]:
    """(inv_freq fp32 [rotary_dim // 2], attention_scaling) for every type except `dynamic`."""
    dim, kind = rotary_dim(config), config.rope_scaling.type
    if kind == "none":
        return _base_inv_freq(config.rope_theta, dim), 1.0
    if kind == "linear":
        return (_base_inv_freq(config.rope_theta, dim) / np.float32(config.rope_scaling.factor)).astype(np.float32), 1.0
    if kind == "yarn":
        return _yarn(config, dim)
    if kind == "llama3":
        return _llama3(config, dim), 1.0
    raise ValueError(f"rope_scaling.type={kind!r} has no static frequencies (expected none/linear/yarn/llama3)")


def _dynamic_inv_freq(config, positions_BT):
    """NTK-aware base growth with the batch's longest sequence (traced)."""
    dim, factor = rotary_dim(config), config.rope_scaling.factor
    max_pos = config.max_position_embeddings
    seq_len = jnp.maximum(jnp.max(positions_BT).astype(jnp.float32) + 1.0, jnp.float32(max_pos))
    base = config.rope_theta * ((factor * seq_len / max_pos) - (factor - 1)) ** (dim / (dim - 2))
    exponents = jnp.arange(0, dim, 2, dtype=jnp.float32) / dim
    return 1.0 / (base ** exponents)


def rope_cos_sin(config, positions_BT, dtype):
    """cos, sin `[B, T, rotary_dim]` (each frequency twice, HF `cat(freqs, freqs)` order) in `dtype`."""
    if config.rope_scaling.type == "dynamic":
        inv_freq, scaling = _dynamic_inv_freq(config, positions_BT), 1.0
    else:
        inv_freq_np, scaling = static_inv_freq(config)
        inv_freq = jnp.asarray(inv_freq_np)
    acc = jnp.promote_types(dtype, jnp.float32)  # fp32, or fp64 for the fp64 oracles
    freqs_BTF = positions_BT.astype(acc)[..., None] * jnp.asarray(inv_freq).astype(acc)
    emb_BTR = jnp.concatenate([freqs_BTF, freqs_BTF], axis=-1)
    return (jnp.cos(emb_BTR) * scaling).astype(dtype), (jnp.sin(emb_BTR) * scaling).astype(dtype)


def apply_rope(x_BTHD, cos_BTR, sin_BTR):
    """Rotate the first R channels of every head (`x * cos + rotate_half(x) * sin`); the rest pass through."""
    R = cos_BTR.shape[-1]
    x_rot, x_pass = x_BTHD[..., :R], x_BTHD[..., R:]
    x1, x2 = x_rot[..., : R // 2], x_rot[..., R // 2:]
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    cos, sin = cos_BTR[:, :, None, :], sin_BTR[:, :, None, :]
    out = (x_rot * cos + rotated * sin).astype(x_BTHD.dtype)
    return out if R == x_BTHD.shape[-1] else jnp.concatenate([out, x_pass], axis=-1)
