"""Building a model, and the functional entries over it: one set of functions that dispatch on
`config.architecture`.

The module is the model; tools, the trainer and the oracles also need pure functions of `(config, params)` to
`jit`, `grad`, shard and checkpoint. `params` is the model's state as a nested dict of arrays (the
`nnx.to_pure_dict` form, the same keys as `nnx.state(model)`), or an `nnx.State`; each entry merges it into the
architecture's module (`bind`, `nnx.merge` with a graph definition cached per config) and calls the module, so
there is one implementation of every model.
"""
from __future__ import annotations

import copy

from flax import nnx

from longtrain.models.registry import get_architecture


def build(config, *, rngs: nnx.Rngs | None = None, key=None) -> nnx.Module:
    """A fresh model for `config` (`rngs=nnx.Rngs(0)`, or `key=` a PRNG key): a `Decoder` (Llama family) or a
    `MiniMax`."""
    return get_architecture(config.architecture)(config, rngs=rngs, key=key)


_ABSTRACT: dict[str, tuple] = {}  # repr(config) -> (graphdef, abstract state); configs are mutable, so unhashable


def abstract_model(config):
    """(graph definition, abstract state of ShapeDtypeStructs) of `config`'s model; nothing is allocated."""
    key = repr(config)
    if key not in _ABSTRACT:
        if len(_ABSTRACT) >= 64:
            _ABSTRACT.clear()
        frozen = copy.deepcopy(config)  # the graphdef keeps its config: a later in-place edit must not reach it
        _ABSTRACT[key] = nnx.split(nnx.eval_shape(lambda: build(frozen, rngs=nnx.Rngs(0))))
    return _ABSTRACT[key]


def bind(config, params) -> nnx.Module:
    """The module of `config` holding `params` (a pure dict or an `nnx.State`); works on tracers inside jit."""
    graphdef, _ = abstract_model(config)
    return nnx.merge(graphdef, params)


def init(config, rng) -> dict:
    """Random parameters for `config` as a nested dict of arrays in `config.param_dtype`. Under `jax.jit` with
    `out_shardings`, each device builds only its shards."""
    return nnx.to_pure_dict(nnx.state(build(config, key=rng)))


def forward_hidden(config, params, tokens, *, positions=None, segment_ids=None, runtime=None, token_index=None,
                   kv_prefix=None, return_kv=False):
    """Final-norm hidden states [B,T,E] before the LM head (and per-layer caches when `return_kv`)."""
    return bind(config, params).hidden(tokens, positions=positions, segment_ids=segment_ids, runtime=runtime,
                                       token_index=token_index, kv_prefix=kv_prefix, return_kv=return_kv)


def lm_head_weight(config, params):
    """[E, V] output projection (the tied embedding transposed when `tie_embeddings`)."""
    return bind(config, params).lm_head_weight()


def forward(config, params, tokens, *, positions=None, segment_ids=None, runtime=None):
    """Logits [B,T,V] in fp32. Materialises the full logits: for training use `longtrain.loss.lm_loss` on
    `forward_hidden` instead."""
    return bind(config, params)(tokens, positions=positions, segment_ids=segment_ids, runtime=runtime)


def param_logical_axes(config) -> dict:
    """Logical axis names per parameter dimension (`vocab`, `embed`, `heads`, `kv_heads`, `head_dim`, `mlp`,
    `layers`, `experts` or None), read from the parameters' metadata (`out_sharding`, set by `layers.param`); a
    nested dict like `init`'s. A parameter created without names is an error, never silently replicated."""
    _, state = abstract_model(config)
    axes: dict = {}
    for path, variable in nnx.to_flat_state(state):
        names = variable.get_metadata().get("out_sharding")
        if names is None:
            raise ValueError(f"parameter {'.'.join(map(str, path))} of architecture {config.architecture!r} has no "
                             "logical axis names (create it with models.layers.param)")
        node = axes
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = tuple(names)
    return axes
