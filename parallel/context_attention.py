"""`context_attention`: one entry for every context-parallel softmax strategy (DESIGN.md §3).

Takes GLOBAL arrays in layout order (q [B,N,Hq,D], k/v [B,N,Hkv,D], segment_ids [B,N]) whose sequence axis is
(or will be constrained to be) sharded over the `context` mesh axis, wraps the strategy's local function in
`jax.shard_map`, and returns out [B,N,Hq,D] in layout order. `from_layout` of the result equals
`kernels.attention` on `from_layout` of the inputs. Batch is sharded over data/fsdp and heads over tensor when
they divide; attention is independent per batch row and head, so strategies only talk over `context`.
"""
from __future__ import annotations

import logging
import math

import jax
from jax.sharding import NamedSharding, PartitionSpec

from longtrain.parallel.blocks import CONTEXT_AXIS, Problem
from longtrain.parallel.layout import LAYOUTS, check_layout

log = logging.getLogger(__name__)

STRATEGIES = ("ring", "token_ring", "all_gather", "ulysses", "ulysses_ring")
BATCH_AXES = ("data", "fsdp")
HEAD_AXIS = "tensor"
_AUTO_LOGGED: set = set()


def axis_size(mesh, name: str) -> int:
    return int(mesh.shape[name]) if name in mesh.axis_names else 1


def io_specs(mesh, batch: int, heads: tuple[int, ...]):
    """(array spec [B,N,H,D], segment spec [B,N]) for this mesh: batch over data/fsdp, seq over context,
    heads over tensor, each only when the mesh axis exists and divides the dimension."""
    batch_axes = tuple(a for a in BATCH_AXES if axis_size(mesh, a) > 1)
    if batch_axes and batch % math.prod(axis_size(mesh, a) for a in batch_axes):
        batch_axes = ()
    b = batch_axes if batch_axes else None
    t = axis_size(mesh, HEAD_AXIS)
    h = HEAD_AXIS if t > 1 and all(n % t == 0 for n in heads) else None
    c = CONTEXT_AXIS if CONTEXT_AXIS in mesh.axis_names else None
    return PartitionSpec(b, c, h, None), PartitionSpec(b, c)


def pick_strategy(*, context_size: int, num_heads: int, num_kv_heads: int, sliding_window=None) -> str:
    """`auto` rule: Ulysses when every rank can own whole K/V heads (fewest bytes, 1/P shrinking); otherwise the
    K/V ring (constant bytes, overlapped). Logged once per distinct pick (P = 1 is plain local attention)."""
    if context_size == 1:
        return "ring"  # no context axis to split: the ring degenerates to one local block, nothing to log
    if context_size > 1 and num_kv_heads % context_size == 0 and num_heads % context_size == 0:
        # (kv heads fewer than P would need replication, which costs more bytes than the ring: not auto)
        pick = "ulysses"
    else:
        pick = "ring"
    key = (pick, context_size, num_heads, num_kv_heads)
    if key not in _AUTO_LOGGED:
        _AUTO_LOGGED.add(key)
        log.warning("context_strategy=auto picked %r (context=%d, heads=%d, kv_heads=%d)", pick, context_size,
                    num_heads, num_kv_heads)
    return pick


def _local_fn(strategy: str, pb: Problem, ulysses_degree):
    if strategy == "ring":
        from longtrain.parallel.ring import ring_attention_local
        return lambda q, k, v, s: ring_attention_local(pb, q, k, v, s)
    if strategy == "token_ring":
        from longtrain.parallel.token_ring import token_ring_attention_local
        return lambda q, k, v, s: token_ring_attention_local(pb, q, k, v, s)
    if strategy == "all_gather":
        from longtrain.parallel.all_gather import all_gather_attention_local
        return lambda q, k, v, s: all_gather_attention_local(pb, q, k, v, s)
    if strategy == "ulysses":
        from longtrain.parallel.ulysses import ulysses_attention_local
        return lambda q, k, v, s: ulysses_attention_local(pb, q, k, v, s)
    if strategy == "ulysses_ring":
        from longtrain.parallel.ulysses_ring import ulysses_ring_attention_local
        return lambda q, k, v, s: ulysses_ring_attention_local(pb, q, k, v, s, ulysses_degree)
    raise ValueError(f"context strategy={strategy!r} is unknown; expected one of {STRATEGIES} or 'auto'")


def context_attention(q, k, v, *, mesh, strategy="auto", layout="zigzag", segment_ids=None, causal=True,
                      sliding_window=None, scale=None, impl="auto", ulysses_degree=None, token_index=None,
                      ring_region=None, **block_kwargs):
    """Softmax attention with the sequence axis split over mesh axis `context` (arrays in layout order).

    `token_index` [B,N] int32 (ring only; 'auto' then means ring): the causal / sliding-window index of every
    token in the arrays' order, sharded like segment_ids, used instead of the layout's global indices (balance
    mode: split documents lie zigzag in the buffer and positions restart per document).
    `ring_region` (with token_index; static int S, 0 <= S <= N/P): only the first S tokens of every rank's block
    take part in ring traffic; queries after them attend to their own rank's block only, with no communication
    (balance mode: split documents fill the first S tokens, whole documents follow; a whole document may start
    inside the region, since its later tokens see the whole local block). None: the whole block rings.
    `block_kwargs` go to the kernel block entries (e.g. interpret=True for Pallas on CPU)."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r} is not a sequence layout; expected one of {LAYOUTS}")
    B, N, Hq, D = q.shape
    Hkv = k.shape[2]
    if k.shape[:2] != (B, N) or v.shape[:3] != k.shape[:3]:
        raise ValueError(f"context_attention needs self-attention shapes: q {q.shape}, k {k.shape}, v {v.shape}")
    if Hq % Hkv:
        raise ValueError(f"num_heads={Hq} must be a multiple of num_kv_heads={Hkv}")
    if segment_ids is not None and segment_ids.shape != (B, N):
        raise ValueError(f"segment_ids shape {segment_ids.shape} must be (batch, seq) = {(B, N)}")
    if ring_region is not None and token_index is None:
        raise ValueError("ring_region needs an explicit token_index (balance mode); got token_index=None")
    if token_index is not None:
        if token_index.shape != (B, N):
            raise ValueError(f"token_index shape {token_index.shape} must be (batch, seq) = {(B, N)}")
        if strategy == "auto":
            strategy = "ring"  # the only strategy that takes explicit indices
        if strategy != "ring":
            raise ValueError(f"token_index is supported by context strategy 'ring' only; got strategy={strategy!r}")
    P = axis_size(mesh, CONTEXT_AXIS)
    check_layout(layout, N, P)
    spec, seg_spec = io_specs(mesh, B, (Hq, Hkv))
    t = 1 if spec[2] is None else axis_size(mesh, HEAD_AXIS)
    local_heads = (Hq // t, Hkv // t)  # heads per tensor shard: what Ulysses splits further
    if strategy == "auto":
        strategy = pick_strategy(context_size=P, num_heads=local_heads[0], num_kv_heads=local_heads[1],
                                 sliding_window=sliding_window)
    if strategy not in STRATEGIES:
        raise ValueError(f"context strategy={strategy!r} is unknown; expected one of {STRATEGIES} or 'auto'")
    _check_heads(strategy, P, local_heads, ulysses_degree)
    pb = Problem(layout=layout, seq_len=N, context_size=P, causal=causal, sliding_window=sliding_window,
                 scale=scale, impl=impl, block_kwargs=tuple(sorted(block_kwargs.items())))
    fn = _local_fn(strategy, pb, ulysses_degree)
    # check_vma=False: kernels are written for single devices (their internal scans/conds create fresh,
    # unannotated carries); every collective here is explicit and the VJPs are custom, so nothing relies on
    # the varying-manual-axes inference.
    if P == 1 and CONTEXT_AXIS not in mesh.axis_names:
        raise ValueError(f"mesh has no {CONTEXT_AXIS!r} axis (axes {mesh.axis_names}); build it with make_mesh")
    constrain = lambda x, s: jax.lax.with_sharding_constraint(x, NamedSharding(mesh, s))
    q, k, v = (constrain(x, spec) for x in (q, k, v))
    if token_index is not None:
        from longtrain.parallel.ring import ring_attention_local, ring_region_attention_local

        seg_in = (jax.numpy.ones((B, N), jax.numpy.int32) if segment_ids is None else segment_ids)
        tok_in = constrain(token_index.astype(jax.numpy.int32), seg_spec)
        if ring_region is None:
            local = lambda q, k, v, s, t: ring_attention_local(pb, q, k, v, s, t)  # noqa: E731
        else:
            if not 0 <= ring_region <= N // P:
                raise ValueError(f"ring_region={ring_region} must lie in [0, {N // P}] (tokens per rank)")
            local = lambda q, k, v, s, t: ring_region_attention_local(pb, q, k, v, s, t, ring_region)  # noqa: E731
        mapped = jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, spec, seg_spec, seg_spec), out_specs=spec,
                               check_vma=False)
        return mapped(q, k, v, constrain(seg_in, seg_spec), tok_in)
    if segment_ids is None:
        mapped = jax.shard_map(lambda q, k, v: fn(q, k, v, None), mesh=mesh, in_specs=(spec, spec, spec),
                               out_specs=spec, check_vma=False)
        return mapped(q, k, v)
    segment_ids = constrain(segment_ids, seg_spec)
    mapped = jax.shard_map(fn, mesh=mesh, in_specs=(spec, spec, spec, seg_spec), out_specs=spec,
                           check_vma=False)
    return mapped(q, k, v, segment_ids)


def _check_heads(strategy: str, P: int, local_heads, ulysses_degree):
    hq, hkv = local_heads
    if strategy == "ulysses" and (hq % P or (hkv % P and P % hkv)):
        raise ValueError(f"context strategy 'ulysses' needs the (per tensor shard) query heads divisible by the "
                         f"context size {P} and kv heads dividing or divisible by it: num_heads={hq}, "
                         f"num_kv_heads={hkv}; use 'ring', 'token_ring', 'all_gather' or 'ulysses_ring' with a "
                         f"smaller ulysses_degree")
    if strategy == "ulysses_ring":
        u = ulysses_degree
        if u is None or u < 1 or P % u:
            raise ValueError(f"context strategy 'ulysses_ring' needs ulysses_degree dividing the context size "
                             f"{P}; got ulysses_degree={u}")
        if hq % u or hkv % u:
            raise ValueError(f"context strategy 'ulysses_ring' needs heads divisible by ulysses_degree={u}: "
                             f"num_heads={hq}, num_kv_heads={hkv}")
