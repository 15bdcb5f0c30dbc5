"""Attention kernels (installed as `longtrain.kernels`): reference, XLA blockwise, Pallas, cuDNN; lightning attention.

Imports nothing else of longtrain: a kernel never learns about meshes or models.
"""
if __name__ != "longtrain.kernels":  # imported as a bare top-level name from the repo root
    from longtrain._top_level import step_aside

    step_aside(__name__, __file__)
else:
    from longtrain.kernels.attention import attention, attention_block, attention_block_bwd, merge_partials
    from longtrain.kernels.lightning import lightning_attention

    __all__ = ["attention", "attention_block", "attention_block_bwd", "lightning_attention", "merge_partials"]
