"""Lightning attention Pallas kernels (GPU Triton, TPU Mosaic): run in the Pallas interpreter on CPU against the
oracles (outputs, final state, gradients incl. d initial_state), bf16 accuracy, and lowering of forward and
backward for `cuda` and `tpu`."""
import re

import jax
import jax.numpy as jnp
import pytest

from longtrain.kernels.lightning.pallas_gpu import lightning_pallas
from longtrain.kernels.lightning.pallas_tpu import lightning_pallas_tpu
from longtrain.kernels.lightning.testing import (assert_bf16_within_2x_plain, assert_close, forward_and_grads,
                                                random_inputs, segment_layout)

# (T, Dk, Dv, block_size, layout): MiniMax's head_dim 96 (padded to 128 inside, two 64-wide tiles), T not a block
# multiple, Dk != Dv, documents that cut blocks, a 1-token document and padding.
PALLAS_CASES = [
    (77, 96, 96, 16, "packed"),
    (128, 64, 32, 32, "aligned"),
]


@pytest.mark.parametrize("T,Dk,Dv,block_size,layout", PALLAS_CASES)
def test_pallas_interpret_matches_reference_and_xla(T, Dk, Dv, block_size, layout):
    x = random_inputs(11, 2, T, 2, Dk, Dv)
    seg = segment_layout(layout, 2, T, block_size)
    ref = forward_and_grads("reference", x, seg)
    got = forward_and_grads("pallas", x, seg, block_size, interpret=True)
    assert_close(got[:2], ref[:2], 1e-5, f"pallas T={T} D={Dk}/{Dv} {layout}")
    assert_close(got[2:], ref[2:], 1e-4, f"pallas grads T={T} D={Dk}/{Dv} {layout}")
    xla = forward_and_grads("xla", x, seg, 64)  # a different block size: the output does not depend on it
    assert_close(got, xla, 1e-4, "pallas vs xla")


def test_pallas_interpret_bf16_within_2x_plain_bf16():
    T, D = 64, 64
    seg = segment_layout("unaligned", 1, T)
    with jax.enable_x64(True):
        oracle = forward_and_grads("reference", random_inputs(12, 1, T, 2, D, D, jnp.float64), seg)
    x = random_inputs(12, 1, T, 2, D, D)
    got = forward_and_grads("pallas", x, seg, 32, dtype=jnp.bfloat16, interpret=True)
    assert got[0].dtype == jnp.bfloat16 and got[1].dtype == jnp.float32

    assert_bf16_within_2x_plain(got, x, seg, oracle)


def _lower_for_cuda(fn, *args):
    return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


def _triton_calls(hlo_text):
    return len(re.findall(r"__gpu\$xla\.gpu\.triton", hlo_text))


@pytest.mark.parametrize("D", [96, 128])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_pallas_lowers_for_cuda_forward_and_backward(D, dtype):
    B, T, H = 1, 300, 2  # T not a block multiple; production block size 64
    x = random_inputs(13, B, T, H, D, D, dtype)
    seg = segment_layout("packed", B, T)

    def fwd(q, k, v, s0):
        return lightning_pallas(q, k, v, x["slope"], segment_ids=seg, initial_state=s0, return_state=True,
                                block_size=64, interpret=False)

    def fwd_bwd(q, k, v, s0):
        (out, state), vjp = jax.vjp(fwd, q, k, v, s0)
        return vjp((out, state))

    args = (x["q"], x["k"], x["v"], x["s0"])
    assert _triton_calls(_lower_for_cuda(fwd, *args)) == 1
    assert _triton_calls(_lower_for_cuda(fwd_bwd, *args)) == 4  # forward, dq, dk, dv


def test_pallas_tpu_interpret_matches_reference():
    T, Dk, Dv = 77, 96, 40  # padded to 128 lanes inside; T not a block multiple
    x = random_inputs(16, 2, T, 2, Dk, Dv)
    seg = segment_layout("packed", 2, T)
    ref = forward_and_grads("reference", x, seg)

    def run(q, k, v, s0, slope, seg, dout, dstate):
        def f(q, k, v, s0):
            return lightning_pallas_tpu(q, k, v, slope, segment_ids=seg, initial_state=s0, return_state=True,
                                        block_size=16, interpret=True)

        (out, state), vjp = jax.vjp(f, q, k, v, s0)
        return (out, state, *vjp((dout, dstate)))

    got = jax.jit(run)(x["q"], x["k"], x["v"], x["s0"], x["slope"], seg, x["dout"], x["dstate"])
    assert_close(got[:2], ref[:2], 1e-5, "pallas tpu")
    assert_close(got[2:], ref[2:], 1e-4, "pallas tpu grads")


@pytest.mark.parametrize("D", [96, 128])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_pallas_tpu_lowers_for_tpu_forward_and_backward(D, dtype):
    B, T, H = 1, 300, 2
    x = random_inputs(17, B, T, H, D, D, dtype)
    seg = segment_layout("packed", B, T)

    def fwd(q, k, v, s0):
        return lightning_pallas_tpu(q, k, v, x["slope"], segment_ids=seg, initial_state=s0, return_state=True,
                                    block_size=64, interpret=False)

    def fwd_bwd(q, k, v, s0):
        (out, state), vjp = jax.vjp(fwd, q, k, v, s0)
        return vjp((out, state))

    args = (x["q"], x["k"], x["v"], x["s0"])
    lower = lambda fn: jax.jit(fn).trace(*args).lower(lowering_platforms=("tpu",)).as_text()  # noqa: E731
    assert len(re.findall("tpu_custom_call", lower(fwd))) == 1
    assert len(re.findall("tpu_custom_call", lower(fwd_bwd))) == 3  # forward, dq, dk+dv


@pytest.mark.gpu
@pytest.mark.parametrize("D", [96, 128])
def test_pallas_compiled_on_gpu_matches_reference(D):
    T = 1000
    x = random_inputs(15, 2, T, 4, D, D)
    seg = segment_layout("packed", 2, T)
    with jax.default_matmul_precision("float32"):  # the oracle must not run its fp32 matmuls in TF32
        ref = forward_and_grads("reference", x, seg)
    got = forward_and_grads("pallas", x, seg, 64)
    assert_close(got[:2], ref[:2], 1e-5, f"compiled pallas D={D}")
    assert_close(got[2:], ref[2:], 1e-4, f"compiled pallas grads D={D}")
    with jax.enable_x64(True):
        oracle = forward_and_grads("reference", random_inputs(15, 2, T, 4, D, D, jnp.float64), seg)
    assert_bf16_within_2x_plain(forward_and_grads("pallas", x, seg, 64, dtype=jnp.bfloat16), x, seg, oracle)


@pytest.mark.slow
@pytest.mark.parametrize("T", [1, 130, 513])
@pytest.mark.parametrize("D", [64, 96, 128])
@pytest.mark.parametrize("layout", ["none", "unaligned", "packed"])
def test_pallas_interpret_sweep(T, D, layout):
    x = random_inputs(14, 2, T, 2, D, D)
    seg = segment_layout(layout, 2, T, 32) if T > 1 else None
    ref = forward_and_grads("reference", x, seg)
    for block_size in (16, 64):
        got = forward_and_grads("pallas", x, seg, block_size, interpret=True)
        assert_close(got[:2], ref[:2], 1e-5, f"pallas T={T} D={D} {layout} C={block_size}")
        assert_close(got[2:], ref[2:], 1e-4, f"pallas grads T={T} D={D} {layout} C={block_size}")
