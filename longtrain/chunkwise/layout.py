"""How a batch is cut into chunks: validation, padding to a whole number of chunks, per-chunk slices.

A batch is a dict of [B, T] arrays (DESIGN.md §3). Chunk-wise training needs `tokens`, `targets` and `loss_mask`;
`positions` default to arange(T) (one document per row) and `segment_ids` to 1 (no padding). T is padded up to
`num_chunks * chunk` with padding tokens (segment id 0, loss mask 0), which no real token ever attends to, so the
padded tail changes nothing.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

REQUIRED_KEYS = ("tokens", "targets", "loss_mask")


def num_chunks(seq_len: int, chunk_size: int) -> int:
    """Number of chunks for a sequence of `seq_len` tokens (a chunk size >= seq_len gives one chunk)."""
    check_chunk_size(chunk_size)
    return max(1, -(-seq_len // chunk_size))


def chunk_and_padded_len(seq_len: int, chunk_size: int, context: int = 1) -> tuple[int, int]:
    """(chunk C, padded length Tp = whole chunks) of a sequence of `seq_len` tokens. With context parallelism
    (`context` = P > 1) a chunk splits into 2P zigzag pieces: C = `chunk_size` (a multiple of 2P), or for one chunk
    T rounded up to 2P; otherwise C = min(chunk_size, T)."""
    check_chunk_size(chunk_size)
    if context == 1:
        chunk = min(chunk_size, seq_len)
    elif chunk_size < seq_len:
        if chunk_size % (2 * context):
            raise ValueError(f"optim.chunk_size={chunk_size} must be a multiple of 2 x mesh.context = {2 * context} "
                             f"for chunk-wise training across the context axis (each chunk splits into "
                             f"{2 * context} zigzag pieces)")
        chunk = chunk_size
    else:
        chunk = -(-seq_len // (2 * context)) * 2 * context
    return chunk, num_chunks(seq_len, chunk) * chunk


def check_chunk_size(chunk_size) -> None:
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0:
        raise ValueError(f"chunk_size must be a positive int (optim.chunk_size); got {chunk_size!r}")


def check_batch(batch) -> tuple[int, int]:
    """(B, T) of a batch, after checking the keys chunk-wise training needs and their shapes."""
    if not isinstance(batch, dict):
        raise TypeError(f"batch must be a dict of [B,T] arrays; got {type(batch).__name__}")
    for key in REQUIRED_KEYS:
        if key not in batch:
            raise KeyError(f"batch has no {key!r}; chunk-wise training needs {REQUIRED_KEYS} "
                           f"(got keys {sorted(batch)})")
    shape = tuple(batch["tokens"].shape)
    if len(shape) != 2:
        raise ValueError(f"batch['tokens'] must be [B,T]; got shape {shape}")
    for key in (*REQUIRED_KEYS, "positions", "segment_ids"):
        if key in batch and tuple(batch[key].shape) != shape:
            raise ValueError(f"batch[{key!r}] has shape {tuple(batch[key].shape)}; expected {shape} like tokens")
    return shape


@dataclasses.dataclass(frozen=True)
class ChunkedBatch:
    """A batch padded to `num_chunks * chunk` tokens. Arrays are [B, Tp]; `num_targets` is the global count."""

    tokens: jax.Array
    targets: jax.Array
    loss_mask: jax.Array
    positions: jax.Array
    segment_ids: jax.Array
    token_index: jax.Array
    num_targets: jax.Array
    chunk: int
    num_chunks: int

    @property
    def padded_len(self) -> int:
        return self.chunk * self.num_chunks

    def slice(self, name: str, i):
        """Chunk i of array `name`: [B, chunk]."""
        return jax.lax.dynamic_slice_in_dim(getattr(self, name), i * self.chunk, self.chunk, axis=1)

    def prefix_segment_ids(self, i):
        """[B, Tp] segment ids of the cache as seen by chunk i: tokens of chunks >= i become padding (0)."""
        before = jnp.arange(self.padded_len)[None, :] < i * self.chunk
        return jnp.where(before, self.segment_ids, 0)

    def last_prefix_segment_id(self, i):
        """[B] segment id of the last token before chunk i (0 for chunk 0, whose carried state is zero)."""
        at = jnp.maximum(i * self.chunk - 1, 0)
        last = jax.lax.dynamic_index_in_dim(self.segment_ids, at, axis=1, keepdims=False)
        return jnp.where(i > 0, last, 0)


def chunk_batch(batch, chunk_size: int, acc_dtype, *, num_targets=None) -> ChunkedBatch:
    """Validate `batch` and pad it to whole chunks of min(chunk_size, T) tokens. A "token_index" in the batch gives
    each token's global index (context parallelism: a rank's share of the sequence); else arange(T).
    `num_targets`: the loss normaliser (None: this batch's own target count)."""
    B, T = check_batch(batch)
    chunk, Tp = chunk_and_padded_len(T, chunk_size)
    full = filled_batch(batch, acc_dtype)

    def pad(x):
        return jnp.pad(x, ((0, 0), (0, Tp - T)))

    return ChunkedBatch(
        **{name: pad(x) for name, x in full.items()},
        token_index=(pad(batch["token_index"].astype(jnp.int32)) if "token_index" in batch
                     else jnp.broadcast_to(jnp.arange(Tp, dtype=jnp.int32), (B, Tp))),
        num_targets=global_num_targets(full["loss_mask"]) if num_targets is None else num_targets, chunk=chunk,
        num_chunks=Tp // chunk)


def filled_batch(batch, acc_dtype) -> dict:
    """The five [B, T] arrays of a chunk-wise batch with their defaults filled in (positions arange(T): one
    document per row; segment ids 1: no padding), ids as int32 and the loss mask in `acc_dtype`."""
    B, T = batch["tokens"].shape
    return {"tokens": batch["tokens"].astype(jnp.int32), "targets": batch["targets"].astype(jnp.int32),
            "loss_mask": batch["loss_mask"].astype(acc_dtype),
            "positions": batch.get("positions", jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T)))
            .astype(jnp.int32),
            "segment_ids": batch.get("segment_ids", jnp.ones((B, T), jnp.int32)).astype(jnp.int32)}


def global_num_targets(loss_mask_BT):
    """The loss normaliser: the number (total weight) of target tokens in the whole batch, at least 1."""
    return jnp.maximum(jnp.sum(loss_mask_BT), 1.0)
