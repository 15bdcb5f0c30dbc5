"""Mixture-of-experts SwiGLU MLP with top-k softmax routing (the MiniMax / Mixtral convention).

Routing (as `transformers` MiniMaxTopKRouter): router logits in the compute dtype, softmax over experts in fp32,
keep the top-k probabilities and renormalise them to sum to 1. Each chosen expert x computes
`down_x(silu(gate_x h) * up_x h)`; the token's output is the weighted sum over its k experts. No capacity limit,
so no token is ever dropped (the result equals the transformers loop exactly, up to fp rounding).

Two implementations of the same function (`ModelConfig.moe_impl`):
- `"dense"`: every expert runs on every token and the combine weights (zero off the top-k) select the result.
  Simple and shard-friendly, but X/k times the FLOPs of the sparse layer and an activation of
  B*T*X*I elements (e.g. 8 experts, I=14336, 32K tokens: 3.8G elements) -- meant for tests and tiny models.
- `"ragged"`: sorted dispatch. The B*T*k (token, expert) assignments are sorted by expert, the tokens gathered
  into that order ([B*T*k, E]), and each expert's contiguous group is multiplied by its weights with
  `jax.lax.ragged_dot`; results are scattered back with the routing weight. On GPU/TPU `ragged_dot` lowers to a
  grouped GEMM (`chlo.ragged_dot`): FLOPs are those of the sparse layer and activation memory is B*T*k*(E + 2I)
  elements, independent of the expert count. On CPU, JAX lowers `ragged_dot` to a dense dot masked per group, so
  there it costs k times the dense impl (use `"dense"` for CPU runs; both give the same function).

Parameters (`config.param_dtype`), per layer: `router.kernel [E, X]`, `experts.gate [X, E, I]`,
`experts.up [X, E, I]`, `experts.down [X, I, E]`. Matmuls run in `config.dtype` with fp32 accumulation; routing
and combining in fp32 (fp64 when the model runs in fp64).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from longtrain.models.layers import Linear, dense, dtype_of, module_keys, param, swiglu

MOE_IMPLS = ("dense", "ragged")


class Experts(nnx.Module):
    """The stacked expert matrices: `gate [X, E, I]`, `up [X, E, I]`, `down [X, I, E]`."""

    def __init__(self, config, *, keys):
        E, I, X = config.hidden_size, config.intermediate_size, config.num_experts
        k_gate, k_up, k_down = keys
        self.gate = param(k_gate, (X, E, I), ("experts", "embed", "mlp"), config)
        self.up = param(k_up, (X, E, I), ("experts", "embed", "mlp"), config)
        self.down = param(k_down, (X, I, E), ("experts", "mlp", "embed"), config)


class MoE(nnx.Module):
    """The MoE layer: router `[E, X]` and the experts (normal init, std `config.init_std`, as transformers
    initialises MiniMax experts)."""

    def __init__(self, config, *, rngs: nnx.Rngs | None = None, key=None):
        if config.moe_impl not in MOE_IMPLS:
            raise ValueError(f"model.moe_impl={config.moe_impl!r} is not a MoE implementation; expected one of "
                             f"{MOE_IMPLS}")
        self.config = config
        k_router, *k_experts = module_keys(rngs, key, 4)
        self.router = Linear((config.hidden_size,), (config.num_experts,), ("embed",), (None,), config, key=k_router)
        self.experts = Experts(config, keys=k_experts)

    def __call__(self, x_BTE, *, runtime=None):
        """x [B, T, E] -> [B, T, E] in the compute dtype (`config.dtype`)."""
        config = self.config
        weights = (self.router.kernel[...], self.experts.gate[...], self.experts.up[...], self.experts.down[...])
        # Routing is per token, so each device can route its own tokens: under a mesh the ragged dispatch runs in a
        # shard_map over the token shards (the expert weights are gathered as FSDP gathers any weight), so its
        # sort, gather and scatter never leave the device. Left to GSPMD, the [B*T] sort over a sharded token axis
        # became a global sort with all-reduces of every token. One expert needs no routing (dense path).
        mesh = getattr(runtime, "mesh", None)
        ragged = config.moe_impl == "ragged" and config.num_experts > 1
        if ragged and mesh is not None and mesh.size > 1 and dict(mesh.shape).get("tensor", 1) == 1:
            out = _tokens_per_device(config, weights, x_BTE, mesh)
        else:  # one device; dense; or tensor parallelism (expert matrices split over `tensor`: GSPMD places them)
            out = _moe_tokens(config, weights, x_BTE, ragged)
        if runtime is not None:
            out = runtime.constrain(out, ("batch", "seq", "embed"))
        return out


def _accum_dtype(dtype):
    """fp32 for fp32/bf16/fp16 compute, fp64 for fp64 (the exactness tests run the model in fp64)."""
    return jnp.promote_types(dtype, jnp.float32)


def route(router_logits_NX, top_k: int):
    """(top-k expert ids [N, k] int32, their renormalised weights [N, k] fp32) from router logits [N, X]."""
    num_experts = router_logits_NX.shape[-1]
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"experts_per_token={top_k} must be in [1, num_experts={num_experts}]")
    probs = jax.nn.softmax(router_logits_NX.astype(_accum_dtype(router_logits_NX.dtype)), axis=-1)
    top_w, top_idx = jax.lax.top_k(probs, top_k)
    top_w = top_w / jnp.sum(top_w, axis=-1, keepdims=True)
    return top_idx.astype(jnp.int32), top_w


def _moe_tokens(config, weights, x_BTE, ragged: bool):
    """Route and run the experts for the tokens of x [B, T, E] (all of them, or one device's); `weights` =
    (router [E, X], gate [X, E, I], up [X, E, I], down [X, I, E])."""
    router_EX, gate_XEI, up_XEI, down_XIE = weights
    cdt, dt = dtype_of(config.dtype), config.dtype
    B, T, E = x_BTE.shape
    x_NE = x_BTE.astype(cdt).reshape(B * T, E)
    if config.num_experts == 1:  # the routing weight is exactly 1: a plain SwiGLU MLP, the Llama MLP's code
        gate, up, down = (lambda h, w=w[0]: dense(h, w, dtype=dt) for w in (gate_XEI, up_XEI, down_XIE))
        return swiglu(x_NE, gate, up, down).reshape(B, T, E)
    top_idx_NK, top_w_NK = route(dense(x_NE, router_EX, dtype=dt), config.experts_per_token)
    experts = _ragged_experts if ragged else _dense_experts
    out = experts(x_NE, *(w.astype(cdt) for w in (gate_XEI, up_XEI, down_XIE)), top_idx_NK, top_w_NK)
    return out.astype(cdt).reshape(B, T, E)


def _tokens_per_device(config, weights, x_BTE, mesh):
    from jax.sharding import PartitionSpec as P

    from longtrain.parallel.sharding import activation_spec

    spec_BTE = activation_spec(("batch", "seq", "embed"), x_BTE.shape, mesh)
    local = lambda w, x: _moe_tokens(config, w, x, ragged=True)  # noqa: E731
    return jax.shard_map(local, mesh=mesh, in_specs=((P(),) * len(weights), spec_BTE), out_specs=spec_BTE,
                         check_vma=False)(weights, x_BTE)


def _dense_experts(x_NE, gate_XEI, up_XEI, down_XIE, top_idx_NK, top_w_NK):
    num_experts = gate_XEI.shape[0]
    # combine weights [N, X]: the routing weight for chosen experts, 0 elsewhere
    acc = _accum_dtype(x_NE.dtype)
    combine_NX = jnp.sum(jax.nn.one_hot(top_idx_NK, num_experts, dtype=acc) * top_w_NK[..., None], axis=1)
    # products in the compute dtype (XLA accumulates in fp32); an fp32 `preferred_element_type` here trips an
    # unimplemented bf16 x bf16 -> f32 dot on the XLA CPU backend once fused into the model
    g_NXI = jnp.einsum("ne,xei->nxi", x_NE, gate_XEI)
    u_NXI = jnp.einsum("ne,xei->nxi", x_NE, up_XEI)
    y_NXE = jnp.einsum("nxi,xie->nxe", jax.nn.silu(g_NXI) * u_NXI, down_XIE)
    return jnp.einsum("nxe,nx->ne", y_NXE.astype(acc), combine_NX)


def _ragged_experts(x_NE, gate_XEI, up_XEI, down_XIE, top_idx_NK, top_w_NK):
    N, K = top_idx_NK.shape
    num_experts = gate_XEI.shape[0]
    expert_A = top_idx_NK.reshape(N * K)  # one row per (token, slot) assignment
    order_A = jnp.argsort(expert_A, stable=True)  # assignments grouped by expert
    token_A = order_A // K
    group_sizes_X = jnp.bincount(expert_A, length=num_experts).astype(jnp.int32)
    cdt, acc = x_NE.dtype, _accum_dtype(x_NE.dtype)

    def grouped(lhs, rhs):  # each expert's contiguous row group times that expert's matrix
        return jax.lax.ragged_dot(lhs, rhs, group_sizes_X, preferred_element_type=acc).astype(cdt)

    xs_AE = x_NE[token_A]
    h_AI = jax.nn.silu(grouped(xs_AE, gate_XEI)) * grouped(xs_AE, up_XEI)
    y_AE = grouped(h_AI, down_XIE).astype(acc)
    y_AE = y_AE * top_w_NK.reshape(N * K)[order_A][:, None]
    return jnp.zeros((N, x_NE.shape[1]), acc).at[token_A].add(y_AE)
