"""The functional model entry points: one set of functions that dispatch on `config.architecture`."""
from __future__ import annotations

import jax.numpy as jnp

from longtrain.models.registry import get_architecture


def init(config, rng):
    """Random parameters for `config` (nested dict of arrays in `config.param_dtype`)."""
    return get_architecture(config.architecture).init(config, rng)


def forward_hidden(config, params, tokens, *, positions=None, segment_ids=None, runtime=None, token_index=None,
                   kv_prefix=None, return_kv=False):
    """Final-norm hidden states [B,T,E] before the LM head (and per-layer caches when `return_kv`)."""
    return get_architecture(config.architecture).forward_hidden(
        config, params, tokens, positions=positions, segment_ids=segment_ids, runtime=runtime,
        token_index=token_index, kv_prefix=kv_prefix, return_kv=return_kv)


def lm_head_weight(config, params):
    """[E, V] output projection (the tied embedding transposed when `tie_embeddings`)."""
    module = get_architecture(config.architecture)
    if hasattr(module, "lm_head_weight"):
        return module.lm_head_weight(config, params)
    from longtrain.models.decoder import lm_head_weight as default_lm_head_weight

    return default_lm_head_weight(config, params)


def forward(config, params, tokens, *, positions=None, segment_ids=None, runtime=None):
    """Logits [B,T,V] in fp32. Materialises the full logits: for training use `longtrain.loss.lm_loss` on
    `forward_hidden` instead."""
    hidden_BTE = forward_hidden(config, params, tokens, positions=positions, segment_ids=segment_ids,
                                runtime=runtime)
    w_EV = lm_head_weight(config, params)
    return jnp.einsum("bte,ev->btv", hidden_BTE.astype(jnp.float32), w_EV.astype(jnp.float32))


def param_logical_axes(config):
    """Logical axis names per parameter dimension (`vocab`, `embed`, `heads`, `kv_heads`, `head_dim`, `mlp`,
    `layers`, `experts` or None)."""
    return get_architecture(config.architecture).param_logical_axes(config)

