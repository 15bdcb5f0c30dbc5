"""Meshes, sharding rules and context-parallel attention (installed as `longtrain.parallel`).

    make_mesh(data=-1, fsdp=1, context=1, tensor=1, devices=None) -> Mesh
    to_layout / from_layout(x, layout, context_size, axis=1)       layouts: contiguous | zigzag | striped
    context_attention(q, k, v, *, mesh, strategy, layout, segment_ids=None, causal=True, sliding_window=None,
                      scale=None, impl="auto")                      strategies: ring | token_ring | all_gather |
                                                                    ulysses | ulysses_ring | auto
    context_lightning_attention(q, k, v, slope, *, mesh, layout="contiguous", segment_ids=None,
                                initial_state=None, variant="all_gather" | "ring")
    ParallelRuntime(mesh, strategy=, layout=, ...)                 the models' runtime contract
    shard_params(params, param_logical_axes, mesh), param_shardings(...), batch_sharding(mesh, shape)
    pool_param_shardings(params, param_logical_axes, mesh)         balance mode: ZeRO-3 over the whole pool
"""
if __name__ != "longtrain.parallel":  # imported as a bare top-level name from the repo root
    from longtrain._top_level import step_aside

    step_aside(__name__, __file__)
else:
    from longtrain.parallel.context_attention import STRATEGIES, context_attention, pick_strategy
    from longtrain.parallel.layout import LAYOUTS, causal_work_per_rank, from_layout, imbalance, to_layout
    from longtrain.parallel.lightning import context_lightning_attention
    from longtrain.parallel.mesh import MESH_AXES, make_mesh, mesh_from_config
    from longtrain.parallel.runtime import ParallelRuntime
    from longtrain.parallel.sharding import (ACTIVATION_RULES, PARAM_RULES, batch_sharding, logical_to_spec,
                                             param_shardings, pool_param_shardings, shard_params)

    __all__ = ["ACTIVATION_RULES", "LAYOUTS", "MESH_AXES", "PARAM_RULES", "STRATEGIES", "ParallelRuntime",
               "batch_sharding", "causal_work_per_rank", "context_attention", "context_lightning_attention",
               "from_layout", "imbalance", "logical_to_spec", "make_mesh", "mesh_from_config", "param_shardings",
               "pick_strategy", "pool_param_shardings", "shard_params", "to_layout"]
