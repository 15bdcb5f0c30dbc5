"""Flax-free functional models (installed as `longtrain.models`): Llama-family decoders and the lightning/softmax
hybrid, behind one set of entry points that dispatch on `config.architecture` (see `registry.py`).

    init(config, rng) -> params
    forward(config, params, tokens, *, positions=None, segment_ids=None, runtime=None) -> logits [B,T,V] fp32
    forward_hidden(config, params, tokens, *, positions=None, segment_ids=None, runtime=None, token_index=None,
                   kv_prefix=None, return_kv=False) -> hidden [B,T,E] (, kv)
    lm_head_weight(config, params) -> [E, V]
    param_logical_axes(config) -> pytree like params of logical axis-name tuples
"""
if __name__ != "longtrain.models":  # imported as a bare top-level name from the repo root
    from longtrain._top_level import step_aside

    step_aside(__name__, __file__)
else:
    from longtrain.models.entry_points import (forward, forward_hidden, init, lm_head_weight,
                                               param_logical_axes)
    from longtrain.models.registry import ARCHITECTURES, get_architecture

    __all__ = ["ARCHITECTURES", "forward", "forward_hidden", "get_architecture", "init", "lm_head_weight",
               "param_logical_axes"]
