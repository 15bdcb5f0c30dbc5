"""Shared building blocks of every decoder (Llama family and the MiniMax hybrid): init helpers, dense, RMSNorm,
embedding, SwiGLU MLP. Plain functions on nested-dict parameter pytrees.

Conventions: parameters are stored in `config.param_dtype` (fp32 by default); matmuls run in `config.dtype` with fp32
accumulation, the result cast back to `config.dtype`. Kernels are stored input-major (`[in, ...out]`), so an HF
`nn.Linear.weight [out, in]` maps to its transpose.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def dtype_of(name: str):
    """A config dtype string ("float32", "bfloat16", ...) as a jnp dtype."""
    return jnp.dtype(name)


def normal_init(rng, shape, std: float, param_dtype: str):
    """Truncation-free normal init, like `transformers` `initializer_range`."""
    return (std * jax.random.normal(rng, shape, jnp.float32)).astype(dtype_of(param_dtype))


def ones(shape, param_dtype: str):
    return jnp.ones(shape, dtype_of(param_dtype))


def zeros(shape, param_dtype: str):
    return jnp.zeros(shape, dtype_of(param_dtype))


def dense(x, kernel, bias=None, *, dtype: str, contract: int = 1):
    """`x[..., in...] @ kernel[in..., out...] (+ bias[out...])`, contracting the last `contract` dims of x with the
    first `contract` dims of the kernel; fp32 accumulation (fp64 for an fp64 model), output in `dtype`."""
    cdt = dtype_of(dtype)
    acc = jnp.promote_types(cdt, jnp.float32)
    out = jnp.tensordot(x.astype(cdt), kernel.astype(cdt), axes=contract, preferred_element_type=acc)
    if bias is not None:
        out = out + bias.astype(acc)
    return out.astype(cdt)


def rms_norm(x, scale, eps: float):
    """RMSNorm over the last axis, as `transformers` does it: normalise in fp32, cast back to the input dtype, then
    multiply by the weight (the product keeps the input dtype)."""
    x32 = x.astype(jnp.promote_types(x.dtype, jnp.float32))  # fp32, or fp64 for the fp64 oracles
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (scale.astype(x.dtype) * normed.astype(x.dtype)).astype(x.dtype)


def embed(embedding_VE, tokens_BT, *, dtype: str):
    """Token embedding lookup -> [B, T, E] in the compute dtype."""
    return jnp.take(embedding_VE, tokens_BT, axis=0).astype(dtype_of(dtype))


# ------------------------------------------------------------------------------------------------ SwiGLU MLP
def init_mlp(config, rng, intermediate_size: int | None = None) -> dict:
    """SwiGLU MLP params: gate/up `[E, F]`, down `[F, E]`, optional biases (`config.mlp_bias`)."""
    E, F = config.hidden_size, intermediate_size or config.intermediate_size
    r_gate, r_up, r_down = jax.random.split(rng, 3)
    std, pdt = config.init_std, config.param_dtype
    p = {
        "gate_proj": {"kernel": normal_init(r_gate, (E, F), std, pdt)},
        "up_proj": {"kernel": normal_init(r_up, (E, F), std, pdt)},
        "down_proj": {"kernel": normal_init(r_down, (F, E), std, pdt)},
    }
    if config.mlp_bias:
        p["gate_proj"]["bias"] = zeros((F,), pdt)
        p["up_proj"]["bias"] = zeros((F,), pdt)
        p["down_proj"]["bias"] = zeros((E,), pdt)
    return p


def mlp_logical_axes(config) -> dict:
    axes = {
        "gate_proj": {"kernel": ("embed", "mlp")},
        "up_proj": {"kernel": ("embed", "mlp")},
        "down_proj": {"kernel": ("mlp", "embed")},
    }
    if config.mlp_bias:
        axes["gate_proj"]["bias"] = ("mlp",)
        axes["up_proj"]["bias"] = ("mlp",)
        axes["down_proj"]["bias"] = ("embed",)
    return axes


def apply_mlp(config, p, x_BTE, runtime=None):
    """down(silu(gate(x)) * up(x)) -> [B, T, E]."""
    gate_BTF = dense(x_BTE, p["gate_proj"]["kernel"], p["gate_proj"].get("bias"), dtype=config.dtype)
    up_BTF = dense(x_BTE, p["up_proj"]["kernel"], p["up_proj"].get("bias"), dtype=config.dtype)
    h_BTF = jax.nn.silu(gate_BTF) * up_BTF
    if runtime is not None:
        h_BTF = runtime.constrain(h_BTF, ("batch", "seq", "mlp"))
    return dense(h_BTF, p["down_proj"]["kernel"], p["down_proj"].get("bias"), dtype=config.dtype)
