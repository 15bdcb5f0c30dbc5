"""Lightning attention: the two oracles agree, the chunked xla impl (custom VJP) matches them on outputs, final
state and gradients (incl. d initial_state), is invariant to the block size, and bad input raises ValueError."""
import jax
import jax.numpy as jnp
import pytest

from longtrain.kernels import lightning_attention
from longtrain.kernels.lightning.api import resolve_impl
from longtrain.kernels.lightning.testing import (assert_bf16_within_2x_plain, assert_close, forward_and_grads,
                                                random_inputs, rel_err, segment_layout)


def test_reference_equals_scan_fp64():
    with jax.enable_x64(True):
        x = random_inputs(0, 2, 45, 3, 16, 8, jnp.float64)
        seg = segment_layout("packed", 2, 45)
        ref = forward_and_grads("reference", x, seg)
        scan = forward_and_grads("scan", x, seg)
        assert_close(scan, ref, 1e-12, "scan vs reference")
        assert float(jnp.max(jnp.abs(ref[1][0]))) == 0.0  # row 0 ends in padding: final state is 0
        assert float(jnp.max(jnp.abs(ref[1][1]))) > 0.1


# (T, Dk, Dv, block_size, layout): T not a block multiple, head_dim 96 and 128, Dk != Dv, a 1-token sequence
XLA_CASES = [
    (77, 16, 24, 16, "packed"),
    (77, 96, 96, 32, "unaligned"),
    (64, 128, 128, 16, "aligned"),
    (50, 32, 32, 64, "none"),
    (1, 8, 8, 16, "none"),
]


@pytest.mark.parametrize("T,Dk,Dv,block_size,layout", XLA_CASES)
def test_xla_matches_oracles_fp64(T, Dk, Dv, block_size, layout):
    with jax.enable_x64(True):
        x = random_inputs(1, 2, T, 2, Dk, Dv, jnp.float64)
        seg = segment_layout(layout, 2, T, block_size)
        ref = forward_and_grads("reference", x, seg)
        got = forward_and_grads("xla", x, seg, block_size)
        assert_close(got, ref, 1e-10, f"xla T={T} D={Dk}/{Dv} C={block_size} {layout}")
        assert got[0].dtype == jnp.float64


def test_xla_fp32_tolerances_and_scan():
    x = random_inputs(2, 2, 100, 3, 64, 64)
    seg = segment_layout("packed", 2, 100)
    ref = forward_and_grads("reference", x, seg)
    scan = forward_and_grads("scan", x, seg)
    got = forward_and_grads("xla", x, seg, 32)
    assert_close(scan, ref, 1e-4, "scan fp32")
    assert_close(got[:2], ref[:2], 1e-5, "xla fp32")
    assert_close(got[2:], ref[2:], 1e-4, "xla fp32 grads")
    assert got[1].dtype == jnp.float32


def test_xla_invariant_to_block_size():
    x = random_inputs(3, 1, 130, 2, 32, 16)
    seg = segment_layout("unaligned", 1, 130)
    base = forward_and_grads("xla", x, seg, 16)
    for block_size in (8, 64, 256):
        assert_close(forward_and_grads("xla", x, seg, block_size), base, 1e-5, f"C={block_size} vs C=16")


def test_xla_without_state_and_initial_state_matches_reference():
    x = random_inputs(4, 2, 40, 2, 16, 16)
    out, ref = jax.jit(lambda q, k, v, s: (lightning_attention(q, k, v, s, impl="xla", block_size=16),
                                           lightning_attention(q, k, v, s, impl="reference")))(
        x["q"], x["k"], x["v"], x["slope"])
    assert out.shape == ref.shape == (2, 40, 2, 16)
    assert rel_err(out, ref) < 1e-5


def test_xla_bf16_within_2x_plain_bf16():
    with jax.enable_x64(True):
        x64 = random_inputs(5, 2, 96, 2, 64, 64, jnp.float64)
        seg = segment_layout("packed", 2, 96)  # row 0 ends in padding (state 0), row 1 carries a state
        oracle = forward_and_grads("reference", x64, seg)
    x = random_inputs(5, 2, 96, 2, 64, 64)
    got = forward_and_grads("xla", x, seg, 32, dtype=jnp.bfloat16)
    assert got[0].dtype == jnp.bfloat16 and got[2].dtype == jnp.bfloat16

    assert_bf16_within_2x_plain(got, x, seg, oracle)


def test_no_nan_for_padding_rows_and_fast_decay():
    x = random_inputs(6, 2, 40, 2, 16, 16)
    seg = jnp.zeros((2, 40), jnp.int32).at[1, 5:30].set(1)  # row 0 all padding
    slope = jnp.array([30.0, 80.0])  # exp(-slope * 63) underflows; masked exponents must not overflow
    x["slope"] = slope
    for impl in ("xla", "reference"):
        out, state, *grads = forward_and_grads(impl, x, seg, 64)
        for a in (out, state, *grads):
            assert bool(jnp.all(jnp.isfinite(a))), impl
        assert float(jnp.max(jnp.abs(out[0]))) == 0.0
        assert float(jnp.max(jnp.abs(state[0]))) == 0.0


def test_slope_is_not_differentiated():
    x = random_inputs(7, 1, 20, 2, 8, 8)
    loss = lambda s: lightning_attention(x["q"], x["k"], x["v"], s, impl="xla", block_size=8).sum()  # noqa: E731
    g = jax.jit(jax.grad(loss))(x["slope"])
    assert g.shape == (2,) and float(jnp.max(jnp.abs(g))) == 0.0


def test_auto_is_xla_on_cpu():
    assert resolve_impl("auto") == ("pallas" if jax.default_backend() == "gpu" else "xla")


@pytest.mark.parametrize("change,match", [
    (dict(impl="flash"), "impl='flash'"),
    (dict(k=jnp.zeros((2, 12, 3, 4))), "k must have the shape of q"),
    (dict(q=jnp.zeros((2, 12, 8))), r"q must be a \[B,T,H,D\]"),
    (dict(v=jnp.zeros((2, 11, 3, 4))), r"v must be \[B,T,H,Dv\]"),
    (dict(slope=jnp.zeros((2,))), r"slope must have shape \[H\]"),
    (dict(segment_ids=jnp.ones((2, 11), jnp.int32)), r"segment_ids must have shape \[B,T\]"),
    (dict(segment_ids=jnp.ones((2, 12), jnp.float32)), "segment_ids must be an integer"),
    (dict(initial_state=jnp.zeros((2, 3, 8, 8))), r"initial_state must have shape \[B,H,Dk,Dv\]"),
    (dict(block_size=0), "block_size must be a positive int"),
    (dict(impl="pallas", block_size=24, interpret=True), "block_size=24 is not supported by impl='pallas'"),
    (dict(impl="xla", interpret=True), "interpret=True only applies to impl='pallas'"),
])
def test_bad_input_raises_value_error_naming_the_argument(change, match):
    args = dict(q=jnp.zeros((2, 12, 3, 8)), k=jnp.zeros((2, 12, 3, 8)), v=jnp.zeros((2, 12, 3, 4)),
                slope=jnp.zeros((3,)))
    kwargs = dict(impl="xla")
    for key, val in change.items():
        (args if key in args else kwargs)[key] = val
    with pytest.raises(ValueError, match=match):
        lightning_attention(args["q"], args["k"], args["v"], args["slope"], **kwargs)


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="checks the CPU error for compiled pallas")
def test_compiled_pallas_on_cpu_raises():
    x = random_inputs(8, 1, 16, 1, 8, 8)
    with pytest.raises(ValueError, match="interpret=True"):
        lightning_attention(x["q"], x["k"], x["v"], x["slope"], impl="pallas")


@pytest.mark.slow
@pytest.mark.parametrize("T", [63, 200, 513])
@pytest.mark.parametrize("D", [64, 96, 128])
@pytest.mark.parametrize("layout", ["none", "aligned", "unaligned", "packed"])
def test_xla_sweep_fp64(T, D, layout):
    with jax.enable_x64(True):
        x = random_inputs(9, 2, T, 2, D, D, jnp.float64)
        seg = segment_layout(layout, 2, T, 32)
        ref = forward_and_grads("reference", x, seg)
        for block_size in (16, 64):
            assert_close(forward_and_grads("xla", x, seg, block_size), ref, 1e-10, f"T={T} D={D} {layout}")
