"""The ONE call site through which every model attention reaches a kernel or a context-parallel strategy.

Contract (other teams build on it):
- A runtime is any object with these duck-typed methods; the model never knows which strategy sits behind it:
    `runtime.attention(q_BTHD, k_BSHD, v_BSHD, *, segment_ids, causal, sliding_window, scale) -> out_BTHD`
    `runtime.lightning_attention(q, k, v, slope_H, *, segment_ids) -> out [B,T,H,Dv]`
    `runtime.constrain(x, logical_axes: tuple) -> x` (a sharding constraint by logical names)
- `runtime=None` means one device: `LocalRuntime` calls `longtrain.kernels.attention` /
  `longtrain.kernels.lightning_attention` with the impl named in the model config (`attention_impl`,
  `lightning_impl`, `lightning_block_size`). `longtrain.parallel.ParallelRuntime` implements the same methods.
- Chunk-wise (SeCO) extras are single-device only: attention against an earlier chunk's cached keys
  (`softmax_attention(..., prefix=...)`), and lightning attention from / to a carried state. They need a
  `LocalRuntime`; any other runtime raises a ValueError that says so.

Model code calls only `softmax_attention`, `lightning_attention` and `constrain` from this module.
"""
from __future__ import annotations

from longtrain import kernels


class LocalRuntime:
    """Single-device runtime: kernels straight from `longtrain.kernels`, sharding constraints are identities."""

    def __init__(self, attention_impl: str = "auto", lightning_impl: str = "auto", lightning_block_size: int = 64):
        self.attention_impl = attention_impl
        self.lightning_impl = lightning_impl
        self.lightning_block_size = lightning_block_size

    @classmethod
    def from_config(cls, config) -> "LocalRuntime":
        return cls(config.attention_impl, config.lightning_impl, config.lightning_block_size)

    def attention(self, q, k, v, *, segment_ids, causal, sliding_window, scale):
        return kernels.attention(q, k, v, segment_ids=segment_ids, causal=causal, sliding_window=sliding_window,
                                 scale=scale, impl=self.attention_impl)

    def attention_with_prefix(self, q, k, v, *, q_index, kv_index, q_segment_ids, kv_segment_ids, causal,
                              sliding_window, scale):
        """q [B,T,..] against keys [B,S,..] that include earlier chunks; indices are global token positions."""
        out, _ = kernels.attention_block(q, k, v, q_index=q_index, kv_index=kv_index, q_segment_ids=q_segment_ids,
                                         kv_segment_ids=kv_segment_ids, causal=causal,
                                         sliding_window=sliding_window, scale=scale, impl=self.attention_impl)
        return out.astype(q.dtype)

    def lightning_attention(self, q, k, v, slope, *, segment_ids, initial_state=None, return_state=False):
        return kernels.lightning_attention(q, k, v, slope, segment_ids=segment_ids, initial_state=initial_state,
                                           return_state=return_state, impl=self.lightning_impl,
                                           block_size=self.lightning_block_size)

    def constrain(self, x, logical_axes):
        return x

    def continues_document(self, last_segment_id_B, segment_ids_BT):
        """bool [B]: the first token of this chunk continues the document the carried state came from."""
        return last_segment_id_B.astype(segment_ids_BT.dtype) == segment_ids_BT[:, 0]


def resolve_runtime(config, runtime):
    """The runtime to use: the given one, or a `LocalRuntime` built from the model config."""
    return LocalRuntime.from_config(config) if runtime is None else runtime


def require_local(runtime, what: str) -> LocalRuntime:
    if not isinstance(runtime, LocalRuntime):
        raise ValueError(f"{what} is single-device only (runtime=None or LocalRuntime); got runtime "
                         f"{type(runtime).__name__}. Chunk-wise training with context parallelism is not supported.")
    return runtime


def gather_layer(runtime, state_l):
    """One layer's parameter state as the layer computes with it: unchanged, unless the runtime holds parameters in
    shards inside a shard_map (chunk-wise training across the context axis gathers them layer by layer, ZeRO-3)."""
    gather = getattr(runtime, "gather_layer", None)
    return state_l if gather is None else gather(state_l)


def constrain(runtime, x, logical_axes: tuple):
    return runtime.constrain(x, logical_axes)


def embedding_table(runtime, table_VE):
    """The embedding table as the lookup needs it. ZeRO-3 shards its embed dimension (over fsdp x context, or the
    whole pool in balance mode: `runtime.param_axes`), so rows gathered from it come out embed-sharded. Over ONE
    mesh axis, XLA moves them to the activations' [batch, seq] sharding with an all-to-all (cheaper than gathering a
    large-vocabulary table). Over TWO or more (e.g. fsdp 8 x context 8) no single collective does it, and XLA's
    partitioner falls back to an "involuntary full rematerialization" (the [B, T, E] rows replicated on every
    device, then re-partitioned); there the table is gathered first, as ZeRO-3 gathers any weight, so the rows come
    out sharded like every activation."""
    mesh = getattr(runtime, "mesh", None)
    axes = getattr(runtime, "param_axes", ())
    if mesh is None or sum(dict(mesh.shape).get(a, 1) > 1 for a in axes) < 2:
        return table_VE
    return runtime.constrain(table_VE, ("vocab", "embed"))


def softmax_attention(runtime, q_BTHD, k_BSHD, v_BSHD, *, segment_ids, sliding_window, scale, prefix=None):
    """Causal softmax attention (GQA when Hq % Hkv == 0).

    `prefix=None`: keys are this chunk's own (S == T) and `segment_ids [B,T]` serves both sides.
    `prefix={"q_index","kv_index","q_segment_ids","kv_segment_ids"}`: keys are [earlier chunks ++ this chunk] and the
    masks use global token indices (single device only).
    """
    if prefix is None:
        return runtime.attention(q_BTHD, k_BSHD, v_BSHD, segment_ids=segment_ids, causal=True,
                                 sliding_window=sliding_window, scale=scale)
    local = require_local(runtime, "attention over a kv_prefix")
    return local.attention_with_prefix(q_BTHD, k_BSHD, v_BSHD, causal=True, sliding_window=sliding_window,
                                       scale=scale, **prefix)


def continues_document(runtime, last_segment_id_B, segment_ids_BT):
    """bool [B]: a chunk's first token continues the document its carried lightning state came from."""
    local = require_local(runtime, "lightning attention with a carried state (kv_prefix/return_kv)")
    return local.continues_document(last_segment_id_B, segment_ids_BT)


def lightning_attention(runtime, q, k, v, slope_H, *, segment_ids, initial_state=None, return_state=False):
    """Lightning (linear, decayed) attention; a carried state (`initial_state`/`return_state`) is single-device."""
    if initial_state is None and not return_state:
        return runtime.lightning_attention(q, k, v, slope_H, segment_ids=segment_ids)
    local = require_local(runtime, "lightning attention with a carried state (kv_prefix/return_kv)")
    return local.lightning_attention(q, k, v, slope_H, segment_ids=segment_ids, initial_state=initial_state,
                                     return_state=return_state)
