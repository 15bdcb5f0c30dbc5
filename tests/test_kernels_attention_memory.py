"""Compiled memory of fwd+bwd grows linearly in T for impl='xla' and quadratically for the reference
(the deterministic CPU proxy for the memory-linear claim; benchmarks/attention_memory.py prints 2K..64K)."""
import importlib.util
import os

_BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks",
                      "attention_memory.py")
_spec = importlib.util.spec_from_file_location("attention_memory_bench", _BENCH)
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def test_xla_temp_memory_linear_reference_quadratic():
    small, large = 256, 2048  # 8x longer
    blocks = dict(block_q=64, block_k=64)
    xla = bench.compiled_memory("xla", large, **blocks)["temp"] / bench.compiled_memory("xla", small, **blocks)["temp"]
    ref = bench.compiled_memory("reference", large)["temp"] / bench.compiled_memory("reference", small)["temp"]
    assert xla <= 9, f"xla temp grew x{xla:.1f} for 8x tokens (want linear, <= 9)"
    assert ref >= 32, f"reference temp grew only x{ref:.1f} for 8x tokens (expected ~64, quadratic)"
