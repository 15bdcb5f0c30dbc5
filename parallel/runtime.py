"""`ParallelRuntime`: the models' runtime contract (models/attention_site.py) on a device mesh.

Models call it on GLOBAL arrays inside jit; its methods wrap the context-parallel strategies' `shard_map`s.
Batches must arrive in layout order (the data loader permutes tokens, positions and segment ids with
`to_layout`), so no permutation runs inside the step.
"""
from __future__ import annotations

from longtrain.parallel.context_attention import context_attention
from longtrain.parallel.lightning import context_lightning_attention
from longtrain.parallel.lightning_pieces import piece_lightning_attention
from longtrain.parallel.sharding import PARAM_RULES, constrain_activation


class ParallelRuntime:
    """Holds the mesh, the context strategy and layout, and the kernel impls."""

    def __init__(self, mesh, *, strategy="auto", layout="zigzag", attention_impl="auto", lightning_impl="auto",
                 lightning_block_size=64, ulysses_degree=None, lightning_variant="all_gather", token_index=None,
                 ring_region=None, param_axes=PARAM_RULES["embed"], lightning_pieces=None):
        """`token_index` [B,N] int32 (optional, usually traced): explicit causal index per token for the ring
        strategy (balance mode builds one runtime per micro-batch with token_index=positions). `ring_region` (static
        int S, with token_index): only the first S tokens of each rank's block ring; the rest attend locally.
        `param_axes`: the mesh axes the parameters' embed dimension is split over (ZeRO-3; balance mode splits
        over the whole pool, `sharding.POOL_AXES`). `lightning_pieces` (static, with token_index): how many runs at
        the start of each rank buffer exchange lightning states (`parallel/lightning_pieces.py`)."""
        self.mesh = mesh
        self.param_axes = tuple(param_axes)
        self.lightning_pieces = lightning_pieces
        self.token_index = token_index
        self.ring_region = ring_region
        self.strategy = strategy
        self.layout = layout
        self.attention_impl = attention_impl
        self.lightning_impl = lightning_impl
        self.lightning_block_size = lightning_block_size
        self.ulysses_degree = ulysses_degree
        self.lightning_variant = lightning_variant

    @classmethod
    def from_config(cls, mesh, mesh_config, model_config, *, param_axes=PARAM_RULES["embed"]) -> "ParallelRuntime":
        """From `longtrain.config.MeshConfig` (strategy, layout, ulysses_degree) and `ModelConfig` (impls)."""
        return cls(mesh, param_axes=param_axes, strategy=mesh_config.context_strategy, layout=mesh_config.layout,
                   attention_impl=model_config.attention_impl, lightning_impl=model_config.lightning_impl,
                   lightning_block_size=model_config.lightning_block_size,
                   ulysses_degree=getattr(mesh_config, "ulysses_degree", None),
                   lightning_variant=getattr(mesh_config, "lightning_variant", "all_gather"))

    def attention(self, q, k, v, *, segment_ids, causal, sliding_window, scale):
        return context_attention(q, k, v, mesh=self.mesh, strategy=self.strategy, layout=self.layout,
                                 segment_ids=segment_ids, causal=causal, sliding_window=sliding_window, scale=scale,
                                 impl=self.attention_impl, ulysses_degree=self.ulysses_degree,
                                 token_index=self.token_index, ring_region=self.ring_region)

    def lightning_attention(self, q, k, v, slope, *, segment_ids):
        if self.token_index is not None:  # balance mode: buffers of document pieces, causality by position
            if self.lightning_pieces is None:  # never run split pieces from a zero state silently
                raise ValueError("lightning attention with an explicit token_index (balance mode) needs "
                                 "lightning_pieces: how many runs at the start of each rank block pass states "
                                 "(the micro-batch's split_pieces)")
            return piece_lightning_attention(q, k, v, slope, mesh=self.mesh, segment_ids=segment_ids,
                                             positions=self.token_index, num_pieces=self.lightning_pieces,
                                             region=self.ring_region, impl=self.lightning_impl,
                                             block_size=self.lightning_block_size)
        return context_lightning_attention(q, k, v, slope, mesh=self.mesh, layout=self.layout,
                                           segment_ids=segment_ids, variant=self.lightning_variant,
                                           impl=self.lightning_impl, block_size=self.lightning_block_size)

    def constrain(self, x, logical_axes):
        return constrain_activation(x, logical_axes, self.mesh)
