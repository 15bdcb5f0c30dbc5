"""longtrain: train long-context language models with JAX.

Subpackages: `longtrain.config` (typed config), `longtrain.models`, `longtrain.parallel`, `longtrain.kernels`.
"""
__version__ = "0.1.0"
