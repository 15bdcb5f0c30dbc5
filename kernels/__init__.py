"""Attention kernels (installed as `longtrain.kernels`): reference, XLA blockwise, Pallas, cuDNN; lightning attention.

Imports nothing else of longtrain: a kernel never learns about meshes or models.
"""
from longtrain.kernels.attention import attention, attention_block, attention_block_bwd, merge_partials
from longtrain.kernels.lightning import lightning_attention

__all__ = ["attention", "attention_block", "attention_block_bwd", "lightning_attention", "merge_partials"]
