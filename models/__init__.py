"""The models as Flax NNX modules (installed as `longtrain.models`): Llama-family decoders and the lightning/softmax
hybrid. `build` makes one; the functional entries (thin wrappers that merge `params` into the module) dispatch on
`config.architecture` (see `registry.py`).

    build(config, *, rngs) -> nnx.Module: model(tokens, positions=, segment_ids=, runtime=) -> logits [B,T,V] fp32,
        model.hidden(tokens, ..., token_index=, kv_prefix=, return_kv=), model.lm_head_weight() -> [E, V]
    bind(config, params) -> the module holding params (a pure dict or an nnx.State)
    init(config, rng) -> params (nested dict of arrays, the nnx.to_pure_dict form of the module's state)
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
    from longtrain.models.entry_points import (abstract_model, bind, build, forward, forward_hidden, init,
                                               lm_head_weight, param_logical_axes)
    from longtrain.models.registry import ARCHITECTURES, get_architecture

    __all__ = ["ARCHITECTURES", "abstract_model", "bind", "build", "forward", "forward_hidden", "get_architecture",
               "init", "lm_head_weight", "param_logical_axes"]
