"""impl='pallas': the Triton kernels (fwd, dq, dk/dv) in interpret mode against the fp64 oracle, the splash
wrapper for TPU in interpret mode, and both lowered from CPU for their real backends (cuda / tpu)."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from longtrain.kernels import attention, attention_block, attention_block_bwd, merge_partials
from test_kernels_attention import check_against_oracle
from test_kernels_attention_oracle import (lse_err, make_segments, oracle, random_qkv, rel_err, run_with_grads,
                                           self_indices)

GPU = dict(interpret=True, block_q=32, block_k=16, block_q_bwd=16, block_k_bwd=32)

# (T, D, Hq, Hkv, causal, segments, sliding_window)
CASES = [
    (200, 96, 4, 2, True, "unaligned", None),  # head_dim 96 is padded to 128 inside
    (130, 64, 4, 1, False, "padding", None),
    (128, 128, 4, 4, True, "one_token", 40),
]


@pytest.mark.parametrize("T,D,Hq,Hkv,causal,seg_kind,window", CASES)
def test_pallas_gpu_interpret_matches_oracle(T, D, Hq, Hkv, causal, seg_kind, window):
    check_against_oracle("pallas", T, D, Hq, Hkv, causal, seg_kind, window, **GPU)


@pytest.mark.slow
@pytest.mark.parametrize("T,D,Hq,Hkv,causal,seg_kind,window", [
    (256, 64, 4, 4, True, "none", None), (77, 128, 4, 2, True, "padding", 16), (160, 96, 4, 1, True, "aligned", None),
    (200, 64, 4, 2, False, "unaligned", None), (96, 128, 4, 1, False, "one_token", 33),
    (100, 64, 4, 2, False, "aligned", 24)])
def test_pallas_gpu_interpret_matches_oracle_sweep(T, D, Hq, Hkv, causal, seg_kind, window):
    check_against_oracle("pallas", T, D, Hq, Hkv, causal, seg_kind, window, **GPU)


def test_pallas_gpu_bf16_within_2x_of_plain_bf16():
    rng = np.random.default_rng(4)
    B, T, Hq, Hkv, D = 1, 128, 4, 2, 64
    q, k, v, do = random_qkv(rng, B, T, Hq, Hkv, D, jnp.bfloat16)
    seg = make_segments("unaligned", B, T, rng)
    qi, ki = self_indices(B, T)
    want = oracle(q, k, v, do, q_index=qi, kv_index=ki, q_seg=seg, kv_seg=seg, causal=True, window=None)
    got = run_with_grads("pallas", q, k, v, do, segment_ids=seg, causal=True, window=None, **GPU)
    plain = run_with_grads("reference", q, k, v, do, segment_ids=seg, causal=True, window=None)
    for i, name in ((0, "out"), (2, "dq"), (3, "dk"), (4, "dv")):
        assert rel_err(got[i], want[i]) <= 2 * rel_err(plain[i], want[i]), name


def test_pallas_gpu_block_api_merges_to_full_attention():
    """attention_block / attention_block_bwd (global indices) through the Triton kernels, two ring steps."""
    rng = np.random.default_rng(6)
    B, N, Hq, Hkv, D = 1, 96, 4, 2, 32
    q_all, k_all, v_all, do_all = random_qkv(rng, B, N, Hq, Hkv, D)
    seg_all = make_segments("unaligned", B, N, rng)
    q_rows, kv_blocks = np.r_[16:48], [np.r_[0:24, 72:96], np.r_[24:72]]
    gidx = lambda rows: jnp.asarray(rows, jnp.int32)[None]
    q, do = q_all[:, q_rows], do_all[:, q_rows]
    kw = dict(causal=True, impl="pallas", **GPU)
    mk = lambda r: dict(q_index=gidx(q_rows), kv_index=gidx(r), q_segment_ids=seg_all[:, q_rows],
                        kv_segment_ids=seg_all[:, r], **kw)

    @jax.jit
    def ring(q, do, k_all, v_all):
        parts = [attention_block(q, k_all[:, r], v_all[:, r], **mk(r)) for r in kv_blocks]
        out, lse = merge_partials(*parts[0], *parts[1])
        return out, lse, [attention_block_bwd(q, k_all[:, r], v_all[:, r], out, lse, do, **mk(r)) for r in kv_blocks]

    out, lse, grads = ring(q, do, k_all, v_all)
    want = oracle(q, k_all, v_all, do, q_index=gidx(q_rows), kv_index=gidx(np.arange(N)), q_seg=seg_all[:, q_rows],
                  kv_seg=seg_all, causal=True, window=None)
    assert rel_err(out, want[0]) < 1e-5 and lse_err(lse, want[1]) < 1e-5
    assert rel_err(grads[0][0] + grads[1][0], want[2]) < 1e-4
    for (_, dk, dv), r in zip(grads, kv_blocks):
        assert rel_err(dk, want[3][:, r]) < 1e-4 and rel_err(dv, want[4][:, r]) < 1e-4


def _lowered_text(platform, backend, dtype, **kw):
    B, T, Hq, Hkv, D = 1, 300, 4, 2, 96  # T not a block multiple, head_dim not a power of two
    q = jnp.ones((B, T, Hq, D), dtype)
    k = jnp.ones((B, T, Hkv, D), dtype)
    seg = jnp.ones((B, T), jnp.int32)

    def loss(q, k, v):
        return attention(q, k, v, segment_ids=seg, causal=True, impl="pallas", backend=backend, **kw).astype(
            jnp.float32).sum()

    fwd = jax.jit(loss).trace(q, k, k).lower(lowering_platforms=(platform,)).as_text()
    fwd_bwd = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(q, k, k).lower(
        lowering_platforms=(platform,)).as_text()
    return fwd, fwd_bwd


@pytest.mark.parametrize("window", [None, 64])
def test_pallas_gpu_lowers_for_cuda(window):
    """Forward and backward kernels go through the real Pallas->Triton lowering (production block sizes)."""
    fwd, fwd_bwd = _lowered_text("cuda", "gpu", jnp.bfloat16, sliding_window=window)
    triton = r"custom_call @__gpu\$xla\.gpu\.triton"
    assert len(re.findall(triton, fwd)) == 1 and "flash_fwd" in fwd
    assert len(re.findall(triton, fwd_bwd)) == 3
    assert all(name in fwd_bwd for name in ("flash_fwd", "flash_dq", "flash_dkv"))


def test_pallas_tpu_splash_lowers_for_tpu():
    fwd, fwd_bwd = _lowered_text("tpu", "tpu", jnp.bfloat16)
    assert fwd.count("custom_call @tpu_custom_call") == 1
    assert fwd_bwd.count("custom_call @tpu_custom_call") == 3  # forward, dq, dkv


@pytest.mark.parametrize("causal,seg_kind,window,hkv", [(True, "padding", None, 2), (False, "unaligned", 40, 1)])
def test_pallas_tpu_splash_interpret_matches_oracle(causal, seg_kind, window, hkv):
    rng = np.random.default_rng(9)
    B, T, Hq, D = 2, 200, 4, 64
    q, k, v, do = random_qkv(rng, B, T, Hq, hkv, D)
    seg = make_segments(seg_kind, B, T, rng)

    def f(q, k, v, do):
        out, vjp = jax.vjp(lambda q, k, v: attention(q, k, v, segment_ids=seg, causal=causal, sliding_window=window,
                                                     impl="pallas", backend="tpu", interpret=True), q, k, v)
        return (out,) + vjp(do)

    got = jax.jit(f)(q, k, v, do)
    qi, ki = self_indices(B, T)
    want = oracle(q, k, v, do, q_index=qi, kv_index=ki, q_seg=seg, kv_seg=seg, causal=causal, window=window)
    assert rel_err(got[0], want[0]) < 1e-5
    for g, w in zip(got[1:], want[2:]):
        assert rel_err(g, w) < 1e-4


def test_pallas_tpu_unsupported_cases_raise():
    q = jnp.ones((1, 8, 2, 16))
    with pytest.raises(NotImplementedError, match="return_lse"):
        attention(q, q, q, impl="pallas", backend="tpu", return_lse=True)
    idx = jnp.arange(8, dtype=jnp.int32)[None]
    with pytest.raises(NotImplementedError, match="attention_block"):
        attention_block(q, q, q, q_index=idx, kv_index=idx, impl="pallas", backend="tpu")


def test_pallas_gpu_rejects_bad_blocks_and_head_dim():
    q = jnp.ones((1, 8, 2, 16))
    with pytest.raises(ValueError, match="block_q=24 must be a power of two"):
        attention(q, q, q, impl="pallas", interpret=True, block_q=24)
    big = jnp.ones((1, 8, 2, 288))
    with pytest.raises(NotImplementedError, match="head_dim <= 256"):
        attention(big, big, big, impl="pallas", interpret=True)
