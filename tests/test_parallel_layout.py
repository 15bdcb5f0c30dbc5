"""Layouts: round trip, balance, global indices; mesh construction; logical sharding rules."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from longtrain.config import MeshConfig
from longtrain.parallel import (causal_work_per_rank, from_layout, imbalance, logical_to_spec, make_mesh,
                                mesh_from_config, param_shardings, to_layout)
from longtrain.parallel.layout import global_index, layout_permutation
from longtrain.parallel.sharding import ACTIVATION_RULES, PARAM_RULES


@pytest.mark.parametrize("layout", ["contiguous", "zigzag", "striped"])
@pytest.mark.parametrize("P", [1, 2, 4, 8])
def test_layout_round_trip_and_permutation(layout, P):
    N = 16 * P
    x = jnp.asarray(np.random.default_rng(P).normal(size=(3, N, 2)))
    y = to_layout(x, layout, P)
    assert not (layout != "contiguous" and P > 1 and bool(jnp.all(y == x)))
    np.testing.assert_array_equal(from_layout(y, layout, P), x)
    perm = layout_permutation(layout, N, P)
    assert sorted(perm.tolist()) == list(range(N))  # a permutation
    # positions (RoPE) follow the permutation: layout position i holds global token perm[i]
    np.testing.assert_array_equal(to_layout(jnp.arange(N)[None], layout, P)[0], perm)
    # the traced index function agrees with the host permutation
    np.testing.assert_array_equal(jax.jit(lambda p: global_index(layout, p, N, P))(jnp.arange(N)), perm)


def test_zigzag_holds_chunks_i_and_mirror():
    P, N = 4, 32
    perm = layout_permutation("zigzag", N, P).reshape(P, -1)
    half = N // (2 * P)
    for r in range(P):
        np.testing.assert_array_equal(perm[r, :half] // half, r)
        np.testing.assert_array_equal(perm[r, half:] // half, 2 * P - 1 - r)
    np.testing.assert_array_equal(layout_permutation("striped", N, P).reshape(P, -1)[1], np.arange(1, N, P))


def test_balance_with_packed_documents():
    rng = np.random.default_rng(0)
    N, P = 4096, 8
    lengths = rng.integers(200, 1200, size=20)
    seg = np.repeat(np.arange(1, 21), lengths)[:N]
    seg = np.pad(seg, (0, N - len(seg)))
    # brute-force count of same-document causal pairs per rank, from the definition
    perm = layout_permutation("zigzag", N, P)
    work = causal_work_per_rank("zigzag", N, P, seg)
    for r in (0, P - 1):
        idx = perm[r * N // P:(r + 1) * N // P]
        brute = sum(int(np.sum((seg[:t + 1] == seg[t]) & (seg[t] != 0))) for t in idx)
        assert work[r] == brute
    assert imbalance(causal_work_per_rank("striped", N, P, seg)) < imbalance(
        causal_work_per_rank("contiguous", N, P, seg))


def test_bad_layout_arguments():
    with pytest.raises(ValueError, match="multiple of 8"):
        to_layout(jnp.zeros((1, 12)), "zigzag", 4)
    with pytest.raises(ValueError, match="layout='spiral'"):
        to_layout(jnp.zeros((1, 16)), "spiral", 4)


def test_make_mesh_fills_and_validates():
    mesh = make_mesh(data=-1, context=4)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 1, "context": 4, "tensor": 1}
    mesh = mesh_from_config(MeshConfig(data=1, fsdp=2, context=2, tensor=-1))
    assert dict(mesh.shape) == {"data": 1, "fsdp": 2, "context": 2, "tensor": 2}
    assert make_mesh(data=1, context=2, devices=jax.devices()[:2]).devices.size == 2
    with pytest.raises(ValueError, match="only one mesh axis may be -1"):
        make_mesh(data=-1, context=-1)
    with pytest.raises(ValueError, match="use 6 devices but 8"):
        make_mesh(data=3, context=2)
    with pytest.raises(ValueError, match="context=0"):
        make_mesh(data=-1, context=0)


def test_sharding_rules():
    mesh = make_mesh(data=1, fsdp=2, context=2, tensor=2)
    P = jax.sharding.PartitionSpec
    # params: ZeRO-3 over fsdp and context (context ranks share weights), Megatron over tensor
    assert logical_to_spec(("embed", "heads", "head_dim"), (64, 4, 16), mesh, PARAM_RULES) == P(
        ("fsdp", "context"), "tensor", None)
    assert logical_to_spec(("batch", "seq", "embed"), (4, 32, 64), mesh, ACTIVATION_RULES) == P("fsdp", "context",
                                                                                               None)
    # not divisible -> replicated over the axes that do not divide, rather than failing
    assert logical_to_spec(("vocab", "embed"), (65, 64), mesh, PARAM_RULES) == P(None, ("fsdp", "context"))
    assert logical_to_spec(("embed",), (6,), mesh, PARAM_RULES) == P("fsdp")
    with pytest.raises(ValueError, match="'bogus'"):
        logical_to_spec(("bogus",), (4,), mesh, PARAM_RULES)
    params = {"w": jnp.zeros((64, 4, 16)), "b": jnp.zeros((4,))}
    shardings = param_shardings(params, {"w": ("embed", "heads", "head_dim"), "b": ("heads",)}, mesh)
    assert shardings["w"].spec == P(("fsdp", "context"), "tensor", None) and shardings["b"].spec == P("tensor")
