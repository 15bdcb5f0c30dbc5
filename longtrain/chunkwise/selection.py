"""SpaCO chunk selection: per-chunk weights w_i (0 = chunk skipped) for `chunk_weighted_grad`.

Bernoulli: z_i ~ Bernoulli(p) independently, w_i = z_i / p. A gradient path through distinct chunks i1..in is scaled
by w_i1...w_in, whose expectation is prod E[w] = 1: exactly unbiased.
Fixed count (the paper): exactly t of k chunks, w_i = k/t on the chosen ones. The weights are dependent, so
E[w_i w_j] = (k/t)^2 t(t-1)/(k(k-1)) != 1: BIASED for any path through two or more chunks.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def bernoulli_weights(rng, num_chunks: int, keep_prob: float):
    """[num_chunks] weights z_i / keep_prob with z_i ~ Bernoulli(keep_prob) independently."""
    if not isinstance(keep_prob, (int, float)) or not 0.0 < keep_prob <= 1.0:
        raise ValueError(f"keep_prob (optim.spaco_keep_prob) must be in (0, 1]; got {keep_prob!r}")
    keep = jax.random.bernoulli(rng, keep_prob, (num_chunks,))
    return jnp.where(keep, 1.0 / keep_prob, 0.0)  # default float dtype: fp64 under x64, so 1/p is exact enough


def fixed_count_weights(rng, num_chunks: int, num_selected: int):
    """[num_chunks] weights k/t on exactly t = num_selected uniformly chosen chunks, 0 elsewhere (biased)."""
    if not isinstance(num_selected, int) or not 1 <= num_selected <= num_chunks:
        raise ValueError(f"num_selected must be an int in [1, num_chunks={num_chunks}]; got {num_selected!r}")
    chosen = jax.random.permutation(rng, num_chunks)[:num_selected]
    keep = jnp.zeros((num_chunks,), bool).at[chosen].set(True)
    return jnp.where(keep, num_chunks / num_selected, 0.0)
