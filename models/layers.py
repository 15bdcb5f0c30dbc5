"""Shared building blocks of every decoder (Llama family and the MiniMax hybrid), as Flax NNX modules: `Linear`,
`RMSNorm`, `Embed`, the SwiGLU `MLP`; and the math they run (`dense`, `rms_norm`), which other modules reuse on
arrays they reshape first.

Conventions: parameters are `nnx.Param`s stored in `config.param_dtype` (fp32 by default) whose metadata
`out_sharding` holds their logical axis names (`parallel/sharding.py` maps names to mesh axes; Flax's eager
sharding is off, so a model builds on one device with no mesh). Matmuls run in `config.dtype` with fp32
accumulation, the result cast back to `config.dtype`. Kernels are stored input-major (`[in, ...out]`), so an HF
`nn.Linear.weight [out, in]` maps to its transpose.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


def dtype_of(name: str):
    """A config dtype string ("float32", "bfloat16", ...) as a jnp dtype."""
    return jnp.dtype(name)


def module_keys(rngs: nnx.Rngs | None, key, n: int):
    """`n` keys for a module's parameters, split from `key` (what a parent module hands down) or, at the top, from
    `rngs.params()` (a user's `nnx.Rngs`). Every parent splits its key the same fixed way, so a seed gives the same
    parameters through `models.init(config, key)` and `build(config, key=key)`, and the same values the models
    gave before they became modules (a run's seed means what it meant)."""
    if key is None:
        if rngs is None:
            raise TypeError("pass rngs=nnx.Rngs(seed) or key=jax.random.key(seed)")
        key = rngs.params()
    return jax.random.split(key, n)


def param(key, shape: tuple, axes: tuple, config, init: str = "normal") -> nnx.Param:
    """An `nnx.Param` of `shape` in `config.param_dtype` named by logical `axes`: normal from `key` with std
    `config.init_std` (no truncation, like `transformers` `initializer_range`), or "ones" / "zeros"."""
    if len(axes) != len(shape):
        raise ValueError(f"logical axes {axes} do not name every dimension of a parameter of shape {shape}")
    pdt = dtype_of(config.param_dtype)
    if init == "normal":
        value = (config.init_std * jax.random.normal(key, shape, jnp.float32)).astype(pdt)
    elif init in ("ones", "zeros"):
        value = (jnp.ones if init == "ones" else jnp.zeros)(shape, pdt)
    else:
        raise ValueError(f"unknown parameter init {init!r}")
    return nnx.Param(value, out_sharding=tuple(axes), eager_sharding=False)


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


class Linear(nnx.Module):
    """`kernel [*in_shape, *out_shape]` (+ optional `bias [*out_shape]`); called on x [..., *in_shape]."""

    def __init__(self, in_shape: tuple, out_shape: tuple, in_axes: tuple, out_axes: tuple, config, *, key,
                 use_bias: bool = False):
        self.dtype, self.contract = config.dtype, len(in_shape)
        self.kernel = param(key, (*in_shape, *out_shape), (*in_axes, *out_axes), config)
        self.bias = param(None, tuple(out_shape), tuple(out_axes), config, init="zeros") if use_bias else None

    def __call__(self, x):
        bias = None if self.bias is None else self.bias[...]
        return dense(x, self.kernel[...], bias, dtype=self.dtype, contract=self.contract)


class RMSNorm(nnx.Module):
    """`scale` of `shape` (ones), normalising over the last axis of its input."""

    def __init__(self, shape: tuple, axes: tuple, config, eps: float):
        self.eps = eps
        self.scale = param(None, tuple(shape), tuple(axes), config, init="ones")

    def __call__(self, x):
        return rms_norm(x, self.scale[...], self.eps)


class Embed(nnx.Module):
    """Token embedding `embedding [V, E]`; the lookup gives [B, T, E] in the compute dtype."""

    def __init__(self, config, *, key):
        self.dtype = config.dtype
        self.embedding = param(key, (config.vocab_size, config.hidden_size), ("vocab", "embed"), config)

    def lookup(self, table_VE, tokens_BT):
        """Rows of `table_VE` (this module's table, or a resharded view of it: `attention_site.embedding_table`)."""
        return jnp.take(table_VE, tokens_BT, axis=0).astype(dtype_of(self.dtype))

    def __call__(self, tokens_BT):
        return self.lookup(self.embedding[...], tokens_BT)


class MLP(nnx.Module):
    """SwiGLU: `down(silu(gate(x)) * up(x))`; gate/up `[E, F]`, down `[F, E]`, optional biases (`config.mlp_bias`)."""

    def __init__(self, config, *, rngs: nnx.Rngs | None = None, key=None, intermediate_size: int | None = None):
        E, F, bias = config.hidden_size, intermediate_size or config.intermediate_size, config.mlp_bias
        k_gate, k_up, k_down = module_keys(rngs, key, 3)
        self.gate_proj = Linear((E,), (F,), ("embed",), ("mlp",), config, key=k_gate, use_bias=bias)
        self.up_proj = Linear((E,), (F,), ("embed",), ("mlp",), config, key=k_up, use_bias=bias)
        self.down_proj = Linear((F,), (E,), ("mlp",), ("embed",), config, key=k_down, use_bias=bias)

    def __call__(self, x_BTE, runtime=None):
        return swiglu(x_BTE, self.gate_proj, self.up_proj, self.down_proj, runtime)


def swiglu(x_BTE, gate, up, down, runtime=None):
    """`down(silu(gate(x)) * up(x))` for callables gate/up/down (the `MLP`'s Linears, or one expert's matrices)."""
    h_BTF = jax.nn.silu(gate(x_BTE)) * up(x_BTE)
    if runtime is not None:
        h_BTF = runtime.constrain(h_BTF, ("batch", "seq", "mlp"))
    return down(h_BTF)
