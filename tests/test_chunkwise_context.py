"""Chunk-wise training across the context axis (issue 16, item 1): every chunk split over P context ranks in the
chunk-major zigzag layout, K/V buffers and their cotangent accumulator sharded along the sequence, queries gathered
per chunk (never the prefix). In fp64 against jax.grad of the full-sequence loss on one device: 1e-10."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from longtrain import models, parallel
from longtrain.chunkwise import chunk_weighted_grad, seco_grad
from longtrain.chunkwise.context import chunk_layout_permutation
from longtrain.parallel.layout import layout_permutation
from test_chunkwise_exact import _exact, _hybrid64, _llama64, _packed_batch, _rel_err

pytestmark = pytest.mark.usefixtures("x64")


@pytest.fixture
def x64():
    with jax.enable_x64(True):
        yield


def _mesh(context, fsdp=1):
    return parallel.make_mesh(data=8 // context // fsdp, fsdp=fsdp, context=context)


def test_chunk_layout_gives_every_rank_a_zigzag_share_of_every_chunk():
    perm = chunk_layout_permutation(48, 16, 4).reshape(4, 3, 4)  # [rank, chunk, token of the rank's share]
    assert sorted(perm.ravel().tolist()) == list(range(48))
    for r in range(4):
        for i in range(3):
            want = i * 16 + np.concatenate([np.arange(2 * r, 2 * r + 2), np.arange(2 * (7 - r), 2 * (7 - r) + 2)])
            np.testing.assert_array_equal(perm[r, i], want)


@pytest.mark.parametrize("context,chunk", [(2, 12), (4, 24), (8, 16)])  # none of them divides T = 40
def test_seco_across_the_context_axis_equals_the_full_gradient(context, chunk):
    config = _llama64()
    params = models.init(config, jax.random.PRNGKey(0))
    batch = _packed_batch(max(2, 8 // context), 40, config.vocab_size)
    loss, grads = _exact(config, params, batch, z_loss=1e-3)
    mesh = _mesh(context)
    got_loss, got = jax.jit(lambda p, b: seco_grad(config, p, b, chunk, z_loss=1e-3, mesh=mesh))(params, batch)
    assert abs(float(got_loss) - float(loss)) <= 1e-10 * abs(float(loss))
    assert _rel_err(got, grads) <= 1e-10


@pytest.mark.parametrize("context,chunk", [(2, 12), (4, 24), (8, 16)])
def test_seco_across_the_context_axis_equals_the_full_gradient_hybrid(context, chunk):
    """The MiniMax hybrid (lightning + softmax, 2 experts): each chunk's lightning pieces take their states from the
    all-gathered piece summaries and the chunk's entering state, resetting at document boundaries (row 0 packs
    three documents, one of which crosses chunk and rank boundaries)."""
    config = _hybrid64()
    params = models.init(config, jax.random.PRNGKey(0))
    batch = _packed_batch(max(2, 8 // context), 40, config.vocab_size)
    loss, grads = _exact(config, params, batch)
    mesh = _mesh(context)
    got_loss, got = jax.jit(lambda p, b: seco_grad(config, p, b, chunk, mesh=mesh))(params, batch)
    assert abs(float(got_loss) - float(loss)) <= 1e-10 * abs(float(loss))
    assert _rel_err(got, grads) <= 1e-10


def test_seco_across_context_with_fsdp_zigzag_batch_and_sliding_window():
    """The trainer's case: the batch arrives in the mesh.layout (zigzag over the whole sequence) order and the
    parameters FSDP-sharded; a sliding window reaches across chunk and rank boundaries."""
    config = _llama64(sliding_window=9, scan_layers=True, remat="full")
    params = models.init(config, jax.random.PRNGKey(3))
    batch = _packed_batch(2, 48, config.vocab_size, seed=4)
    loss, grads = _exact(config, params, batch)
    mesh = _mesh(4, fsdp=2)
    sharded = jax.device_put(params, parallel.param_shardings(params, models.param_logical_axes(config), mesh))
    perm = layout_permutation("zigzag", 48, 4)
    zig = {k: v[:, perm] for k, v in batch.items()}
    got_loss, got = jax.jit(lambda p, b: seco_grad(config, p, b, 16, mesh=mesh, batch_layout="zigzag"))(sharded, zig)
    assert abs(float(got_loss) - float(loss)) <= 1e-10 * abs(float(loss))
    assert _rel_err(got, grads) <= 1e-10


def test_spaco_weights_across_context_equal_one_device():
    """Any chunk selection (SpaCO's weights, a dropped chunk included) gives the single-device estimate, so the
    expectation over selections stays exact."""
    config = _llama64()
    params = models.init(config, jax.random.PRNGKey(1))
    batch = _packed_batch(2, 40, config.vocab_size, seed=2)
    weights = jnp.asarray([2.0, 0.0, 2.0], jnp.float64)
    want_loss, want = jax.jit(lambda p, b: chunk_weighted_grad(config, p, b, 16, weights, loss_from_forward=True))(
        params, batch)
    mesh = _mesh(8)
    got_loss, got = jax.jit(lambda p, b: chunk_weighted_grad(config, p, b, 16, weights, loss_from_forward=True,
                                                             mesh=mesh))(params, batch)
    assert abs(float(got_loss) - float(want_loss)) <= 1e-10 * abs(float(want_loss))
    assert _rel_err(got, want) <= 1e-10


def test_collective_bytes_grow_only_by_one_gradient_reduce_scatter_per_chunk():
    """The prefix never moves: per chunk only that chunk's queries, outputs and weights travel (T in all over the
    chunks). With replicated parameters the gradient is summed locally and reduced once, so the compiled step's
    collective bytes (while-loop trip counts included) are the same for 4 and 8 chunks. With ZeRO-3 parameters (the
    default rules) every extra chunk adds exactly one reduce-scatter of the split parameters' gradient."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    from longtrain.parallel.hlo_comm import collective_bytes, total_bytes

    config = _llama64()
    params = models.init(config, jax.random.PRNGKey(0))
    batch = _packed_batch(1, 256, config.vocab_size)
    mesh = parallel.make_mesh(data=1, context=8)

    def comm(chunk, shardings=None):
        step = jax.jit(lambda p, b: seco_grad(config, p, b, chunk, mesh=mesh, grad_shardings=shardings))
        return collective_bytes(step.lower(params, batch).compile().as_text(), 8)

    replicated = jax.tree.map(lambda _: NamedSharding(mesh, P()), params)
    four, eight = comm(64, replicated), comm(32, replicated)
    assert four.get("all-gather", 0) > 0, four
    assert total_bytes(eight) == pytest.approx(total_bytes(four), rel=1e-6), (four, eight)

    zero3 = parallel.param_shardings(params, models.param_logical_axes(config), mesh)
    split = sum(x.size * x.dtype.itemsize * 7 / 8 for x, s in zip(jax.tree.leaves(params), jax.tree.leaves(zero3))
                if s.shard_shape(x.shape) != x.shape)
    assert split > 0
    four, eight = comm(64, zero3), comm(32, zero3)
    assert eight["reduce-scatter"] - four["reduce-scatter"] == pytest.approx(4 * split, rel=1e-6), (four, eight)


def test_vocabulary_tables_sent_in_the_compute_dtype_give_the_same_values_and_gradients():
    """The embedding and LM head travel cast to bf16 (half the bytes) and reach their consumers in fp32 again, the
    gradient reduce-scattered in fp32: bitwise what the consumer's own cast after an fp32 gather gives."""
    from jax.sharding import PartitionSpec as P

    from longtrain.chunkwise.context import _gather, _gather_as

    mesh = parallel.make_mesh(data=2, context=4)
    spec = P(None, ("data", "context"))
    x = jax.random.normal(jax.random.PRNGKey(0), (5, 16), jnp.float32)
    ct = jax.random.normal(jax.random.PRNGKey(1), (5, 16), jnp.bfloat16)  # the consumer's bf16 cotangent

    def run(gather):
        def local(x, ct):
            y, vjp = jax.vjp(gather, x)
            return y, vjp(ct)[0]
        return jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(spec, P()), out_specs=(P(), spec),
                                     check_vma=False))(x, ct)

    y_cast, g_cast = run(lambda x: _gather_as(x, spec, jnp.bfloat16).astype(jnp.bfloat16))
    y_ref, g_ref = run(lambda x: _gather(x, spec).astype(jnp.bfloat16))
    assert y_cast.dtype == jnp.bfloat16 and g_cast.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(y_cast, np.float32), np.asarray(y_ref, np.float32))
    np.testing.assert_array_equal(np.asarray(g_cast), np.asarray(g_ref))


def test_bf16_model_gradients_equal_with_the_vocabulary_tables_sent_in_bf16(monkeypatch):
    """Through the real embedding lookup and LM loss (bf16 compute, fp32 parameters, ZeRO-3 over context): sending
    the vocabulary tables in bf16 changes no gradient bit (the consumers still form their gradients in fp32)."""
    import dataclasses

    from longtrain.chunkwise import context

    config = dataclasses.replace(_llama64(), dtype="bfloat16", param_dtype="float32", attention_impl="xla")
    with jax.enable_x64(False):
        params = models.init(config, jax.random.PRNGKey(0))
        rng = np.random.default_rng(3)
        tokens = jnp.asarray(rng.integers(0, 4, (2, 64)), jnp.int32)  # few distinct tokens: repeated lookups
        batch = {"tokens": tokens, "targets": jnp.roll(tokens, -1, 1), "loss_mask": jnp.ones((2, 64), jnp.float32)}
        mesh = parallel.make_mesh(data=2, context=4)
        step = lambda: jax.jit(lambda p, b: seco_grad(config, p, b, 32, mesh=mesh))(params, batch)  # noqa: E731
        sent_bf16 = step()
        monkeypatch.setattr(context, "_gather_as", lambda x, spec, dtype: context._gather(x, spec))
        sent_fp32 = step()
    for a, b in zip(jax.tree.leaves(sent_bf16), jax.tree.leaves(sent_fp32)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
