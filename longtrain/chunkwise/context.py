"""SeCO/SpaCO across the context axis: every chunk's tokens are split over the P context ranks, each rank keeps
T/P of the K/V buffers and of their cotangent accumulator, and a chunk's queries meet the sharded prefix without
anyone gathering it.

Layout (chunk-major zigzag, `chunk_layout_permutation`): rank r holds, of every chunk i, the zigzag pieces r and
2P-1-r of that chunk's C tokens (C/P tokens per chunk, T/P in all), stored chunk after chunk. Why zigzag inside each
chunk: a chunk attends causally to itself, and with pieces r and 2P-1-r every rank's share of the chunk's diagonal
block has the same causal work; every rank also holds the same share of every earlier chunk, so the prefix work is
balanced too. Because the layout is chunk-major, the single-device engine (`engine.py`) runs unchanged on each rank
with chunk size C/P: its local chunk i IS its share of chunk i, and its local buffer its share of the prefix.

Attention of a chunk against the prefix (`ContextChunkRuntime.attention_with_prefix`), per softmax layer:
  1. all-gather the chunk's queries over `context` ([B, C] of them: chunk-sized, never the O(T) prefix);
  2. attend them to this rank's keys (its share of the prefix ++ its share of the chunk): partial (out, lse);
  3. merge the P partials by their log-sum-exp weights, each rank keeping its own queries' rows (reduce-scatter).
sum_r w_r out_r / sum_r w_r with w_r = exp(lse_r - m) is the softmax over all keys for any constant m (the max over
ranks, taken without gradient), so value and gradient are exact; jax differentiates the collectives (the
all-gather's transpose is a reduce-scatter, and back), so each rank's K/V cotangents land in its own accumulator.
Bytes per rank per softmax layer and chunk: (P-1)/P of the chunk's queries, outputs and weights; the K/V never move.

Losses are summed, not normalised per rank (ranks exchange cotangents, so all must use one scale). Parameters are
held as their specs say (`ShardedParams`): a split one is gathered where it is used and its gradient reduce-
scattered into the shard at every chunk; a replicated one's gradient is summed over the chunks and reduced once.
The sums are divided by the global target count at the end.
Lightning layers (the MiniMax hybrid): a rank's share of a chunk is two zigzag pieces, so the context-parallel
lightning attention (`parallel.lightning`, all_gather variant) runs them: every rank summarises its pieces, the
summaries are all-gathered, and each piece starts from the decayed prefix of the chunk's entering state and the
earlier pieces (resets at document boundaries); the state leaving the chunk is the same on every rank.
"""
from __future__ import annotations

import numpy as np

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from longtrain.chunkwise.layout import chunk_and_padded_len, filled_batch
from longtrain import models, parallel
from longtrain.models.attention_site import LocalRuntime
from longtrain.models.layers import dtype_of
from longtrain.parallel.layout import layout_permutation

CONTEXT = "context"


def chunk_layout_permutation(padded_len: int, chunk: int, context: int) -> np.ndarray:
    """perm [Tp]: layout position -> global token index. Rank r's block [r*Tp/P, (r+1)*Tp/P) holds, chunk after
    chunk, the zigzag share r of every chunk's `chunk` tokens."""
    k, n = padded_len // chunk, chunk // context
    within = layout_permutation("zigzag", chunk, context).reshape(context, n)  # rank r's tokens of one chunk
    perm = np.arange(k)[None, :, None] * chunk + within[:, None, :]  # [P, k, C/P]
    return perm.reshape(padded_len).astype(np.int32)


class ContextChunkRuntime(LocalRuntime):
    """The local kernels of one rank inside the chunk-wise `shard_map`, plus attention against the prefix sharded
    over the `context` axis (module docstring), and ZeRO-3 parameters: every rank holds only its shard of each
    parameter (`ShardedParams`), gathered as it is used."""

    def __init__(self, attention_impl, lightning_impl, lightning_block_size, params: "ShardedParams"):
        super().__init__(attention_impl, lightning_impl, lightning_block_size)
        self.params = params

    def gather_layer(self, state_l):
        return self.params.gather_layer(state_l)

    def gather_outer_params(self, params):
        return self.params.gather(params, layers=False)

    def gather_all_params(self, params):
        return self.params.gather(params, layers=True)

    def attention(self, *args, **kwargs):
        raise ValueError("chunk-wise training across the context axis runs every chunk against its prefix "
                         "(attention_with_prefix); plain self-attention has no place here")

    def attention_with_prefix(self, q, k, v, *, q_index, kv_index, q_segment_ids, kv_segment_ids, causal,
                              sliding_window, scale):
        from longtrain import kernels

        def gather(x):
            return jax.lax.all_gather(x, CONTEXT, axis=1, tiled=True)

        out_BCHD, lse_BHC = kernels.attention_block(
            gather(q), k, v, q_index=gather(q_index), kv_index=kv_index, q_segment_ids=gather(q_segment_ids),
            kv_segment_ids=kv_segment_ids, causal=causal, sliding_window=sliding_window, scale=scale,
            impl=self.attention_impl)
        lse_BCH = jnp.swapaxes(lse_BHC, 1, 2)
        m = jax.lax.pmax(jax.lax.stop_gradient(lse_BCH), CONTEXT)
        m = jnp.where(jnp.isfinite(m), m, 0.0)  # a row no rank sees (padding): weights 0 everywhere
        w_BCH = jnp.exp(lse_BCH - m)
        num = jax.lax.psum_scatter(out_BCHD * w_BCH[..., None], CONTEXT, scatter_dimension=1, tiled=True)
        den = jax.lax.psum_scatter(w_BCH, CONTEXT, scatter_dimension=1, tiled=True)
        return (num / jnp.where(den > 0, den, 1.0)[..., None]).astype(q.dtype)

    def continues_document(self, last_segment_id_B, segment_ids_BT):
        """The chunk's first token and the prefix's last one are both rank 0's (its share starts with the chunk's
        first zigzag piece and ends with its last): every rank takes rank 0's answer."""
        return _from_rank0(super().continues_document(last_segment_id_B, segment_ids_BT).astype(jnp.int32)) > 0

    def lightning_attention(self, q, k, v, slope, *, segment_ids, initial_state=None, return_state=False):
        """This rank's zigzag pieces of the chunk, their entering states from the all-gathered piece summaries
        and the chunk's entering state (`parallel.lightning.local_lightning`); with `return_state` the state
        after the chunk's last token (the same on every rank)."""
        from longtrain.parallel.lightning import local_lightning

        B, _, H, Dk = q.shape
        init = (jnp.zeros((B, H, Dk, v.shape[-1]), jnp.float32) if initial_state is None
                else initial_state.astype(jnp.promote_types(initial_state.dtype, jnp.float32)))
        return local_lightning(q, k, v, slope, segment_ids, init, layout="zigzag",
                               P=jax.lax.axis_size(CONTEXT), variant="all_gather", impl=self.lightning_impl,
                               block_size=self.lightning_block_size, return_state=return_state)


def _gather(x, spec):
    """All-gather the dimensions of a local shard that `spec` splits over mesh axes (inside the shard_map). The
    transpose, in the backward, reduce-scatters the gradient into the shard."""
    for dim, entry in enumerate(spec):
        axes = _axes_of(entry)
        if axes:
            x = jax.lax.all_gather(x, axes, axis=dim, tiled=True)
    return x


def _spec_axes(entry) -> tuple:
    """The mesh axis names of one PartitionSpec entry (None, a name, or a tuple of names)."""
    return (entry,) if isinstance(entry, str) else tuple(entry or ())


def _axes_of(entry) -> tuple:
    """The axes of a spec entry that really split (size > 1), inside the shard_map."""
    return tuple(a for a in _spec_axes(entry) if jax.lax.axis_size(a) > 1)


def _gather_as(x, spec, dtype):
    """`_gather` of x that sends it in `dtype` (half the bytes on the wire) and hands the consumer x's own dtype
    again, its gradient reduce-scattered in x's dtype: bitwise what gathering in x's dtype gives for a weight its
    consumer casts to `dtype` anyway (the embedding lookup and the LM head), whose gradient the consumer then
    still forms in x's dtype."""

    @jax.custom_vjp
    def gathered(x):
        return _gather(x.astype(dtype), spec).astype(x.dtype)

    def fwd(x):
        return gathered(x), jnp.zeros((), x.dtype)  # residual: only x's dtype (the transpose needs no values)

    def bwd(like, g):  # the transpose of the plain gather: a reduce-scatter in x's dtype
        shard = jax.ShapeDtypeStruct(x.shape, like.dtype)
        return jax.linear_transpose(lambda y: _gather(y, spec), shard)(g.astype(like.dtype))

    gathered.defvjp(fwd, bwd)
    return gathered(x)


class ShardedParams:
    """Which parameter shards a rank holds: the partition specs of the parameter dict (the trainer's ZeRO-3 rules,
    `parallel.param_shardings`) and, for a layer slice seen inside a layer stack (an nnx state whose Variables carry
    their logical axes), the spec of each leaf by (logical axes, local shape)."""

    def __init__(self, logical_axes, specs, mesh, compute_dtype=None):
        """`compute_dtype`: the vocabulary tables (embedding, LM head), which the model only uses cast to it, are
        gathered in it (`_gather_as`)."""
        self.logical_axes, self.specs, self.mesh, self.compute_dtype = logical_axes, specs, mesh, compute_dtype
        self.by_leaf: dict[tuple, tuple] = {}

    def register(self, abstract_params):
        """Index every stacked leaf by (its logical axes without "layers", its local per-layer shape)."""
        from longtrain.parallel.sharding import is_axes_leaf

        def add(axes, spec, a):
            if not axes or axes[0] != "layers":
                return
            local = jax.sharding.NamedSharding(self.mesh, spec).shard_shape(a.shape)[1:]
            key, value = (tuple(axes[1:]), tuple(local)), tuple(spec)[1:]
            if self.by_leaf.setdefault(key, value) != value:
                raise ValueError(f"two stacked parameters with logical axes {key[0]} and local shape {key[1]} are "
                                 f"sharded differently ({self.by_leaf[key]} vs {value})")

        jax.tree.map(add, self.logical_axes, self.specs, abstract_params, is_leaf=is_axes_leaf)
        return self

    def gather(self, params, *, layers: bool):
        """The parameter dict with its shards gathered: every leaf outside the layer stacks, and with `layers` the
        stacked ones too (shape inference only: the layers gather one layer at a time as they run)."""
        from longtrain.parallel.sharding import is_axes_leaf

        def one(axes, spec, x):
            if axes and axes[0] == "layers" and not layers:
                return x
            cast = self.compute_dtype
            if (cast is not None and "vocab" in axes and jnp.issubdtype(x.dtype, jnp.floating)
                    and jnp.dtype(cast).itemsize < x.dtype.itemsize):
                return _gather_as(x, spec, cast)
            return _gather(x, spec)

        return jax.tree.map(one, self.logical_axes, self.specs, params, is_leaf=is_axes_leaf)

    def gather_layer(self, state_l):
        from flax import nnx

        def one(v):
            if not isinstance(v, nnx.Variable):
                return v
            axes = tuple(v.get_metadata().get("out_sharding") or ())
            axes = axes[1:] if axes[:1] == ("layers",) else axes
            spec = self.by_leaf.get((axes, tuple(v.shape)))
            return v if spec is None else v.replace(_gather(v.get_value(), spec))

        return jax.tree.map(one, state_l, is_leaf=lambda x: isinstance(x, nnx.Variable))


def _from_rank0(x):
    """Rank 0's value of x on every rank of the context axis (integers)."""
    return jax.lax.psum(jnp.where(jax.lax.axis_index(CONTEXT) == 0, x, jnp.zeros_like(x)), CONTEXT)


def gather_index(seq_len: int, padded_len: int, chunk: int, context: int,
                 batch_layout: str) -> tuple[np.ndarray, np.ndarray]:
    """[Tp] index into the batch padded to Tp (sequence in `batch_layout` order, padding appended) that reorders
    it into the chunk-major layout; -> (index, global token index of every chunk-layout position)."""
    wanted = chunk_layout_permutation(padded_len, chunk, context)  # global token at each chunk-layout position
    arrived = (np.arange(seq_len) if batch_layout == "contiguous"  # global token at each batch position
               else layout_permutation(batch_layout, seq_len, context))
    where = np.empty(seq_len, np.int32)
    where[arrived] = np.arange(seq_len, dtype=np.int32)  # batch position of each global token
    index = np.where(wanted < seq_len, where[np.minimum(wanted, seq_len - 1)], wanted)  # padding stays at the end
    return index.astype(np.int32), wanted


def context_parallel_chunkwise(model_config, params, batch, chunk_size: int, mesh, local_grad, *, acc_dtype,
                               batch_layout: str = "contiguous", param_specs=None):
    """(loss, grads) of the whole batch, normalised by its global target count, with every chunk split over
    `mesh`'s context axis. `batch` [B, T] arrives in the `batch_layout` sequence order (the trainer's mesh.layout).
    `local_grad(params, local_batch, chunk, runtime) -> (loss_sum, grads_sum)` runs the engine on one rank's share
    (local batch: [b, Tp/P] in the chunk-major layout, with its global "token_index").

    `param_specs` (pytree like params of PartitionSpecs; default: the trainer's ZeRO-3 rules) say which shard of
    each parameter a rank holds. A split parameter is gathered where it is used and its gradient reduce-scattered
    into the shard at every chunk (memory: shards only; bytes: one gradient reduce-scatter per chunk). A replicated
    parameter's gradient is summed locally over the chunks and reduced once."""
    B, T = batch["tokens"].shape
    Pc = mesh.shape[CONTEXT]
    C, Tp = chunk_and_padded_len(T, chunk_size, Pc)
    index, token_index = gather_index(T, Tp, C, Pc, batch_layout)
    full = filled_batch(batch, acc_dtype)
    laid = {name: jnp.pad(x, ((0, 0), (0, Tp - T)))[:, index] for name, x in full.items()}  # padding: segment 0
    laid["token_index"] = jnp.broadcast_to(jnp.asarray(token_index), (B, Tp))
    row_axes = tuple(a for a in ("data", "fsdp") if a in mesh.axis_names)
    spec = P(row_axes, CONTEXT)
    laid = {name: jax.lax.with_sharding_constraint(x, jax.sharding.NamedSharding(mesh, spec))
            for name, x in laid.items()}
    logical_axes = models.param_logical_axes(model_config)
    if param_specs is None:
        param_specs = jax.tree.map(lambda s: s.spec, parallel.param_shardings(params, logical_axes, mesh))
    sharded = ShardedParams(logical_axes, param_specs, mesh, dtype_of(model_config.dtype)).register(params)
    runtime = ContextChunkRuntime(model_config.attention_impl, model_config.lightning_impl,
                                  model_config.lightning_block_size, sharded)
    reduce_axes = (*row_axes, CONTEXT)

    def rest_of(spec):  # the batch axes a gradient shard is not yet summed over (its gather's transpose did those)
        done = {a for entry in spec for a in _spec_axes(entry)}
        return tuple(a for a in reduce_axes if a not in done)

    def local(p, local_batch):
        loss_sum, grads = local_grad(p, local_batch, C // Pc, runtime)
        n = jnp.sum(local_batch["loss_mask"])
        loss_sum, n = jax.lax.psum((loss_sum, n), reduce_axes)  # once per call, not per chunk
        grads = jax.tree.map(lambda g, s: jax.lax.psum(g, rest_of(s)) if rest_of(s) else g, grads, param_specs)
        n = jnp.maximum(n, 1.0)
        return loss_sum / n, jax.tree.map(lambda g: g / n.astype(g.dtype), grads)

    return jax.shard_map(local, mesh=mesh, in_specs=(param_specs, spec), out_specs=(P(), param_specs),
                         check_vma=False)(params, laid)
