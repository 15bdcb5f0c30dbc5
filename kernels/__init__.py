"""Attention kernels (installed as `longtrain.kernels`): reference, XLA blockwise, Pallas, cuDNN; lightning attention."""
