"""`longtrain plan`: AOT compile of the train step on simulated devices, memory and communication report."""
import os
import re
import subprocess
import sys

import pytest

from longtrain.commands.plan import parse_bytes

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _plan(args, timeout=400):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", "longtrain", "plan", *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


def _gib(text, key):
    m = re.search(rf"^\s+{key}\s+([\d.]+) (GiB|MiB|KiB|B)$", text, re.M)
    assert m, f"no '{key}' line in:\n{text}"
    return float(m.group(1)) * {"GiB": 2**30, "MiB": 2**20, "KiB": 2**10, "B": 1}[m.group(2)]


def test_parse_bytes():
    assert parse_bytes("80GiB") == 80 * 2**30 and parse_bytes("1.5 GB") == 1_500_000_000 and parse_bytes("1e3") == 1000
    with pytest.raises(Exception, match="--memory-limit"):
        parse_bytes("lots")


def test_plan_8b_128k_on_8_simulated_devices_reports_and_fails_over_limit():
    r = _plan([os.path.join(REPO, "configs", "llama_8b_128k.yaml"), "--devices", "8", "--memory-limit", "80GiB"])
    out = r.stdout
    assert "mesh data=1 x fsdp=1 x context=8 x tensor=1" in out, r.stderr[-3000:]
    # parameters: the 8B model in fp32, sharded ZeRO-3 style over the 8 context ranks (they share the weights)
    n_params = 128256 * 4096 * 2 + 32 * (4096 * 4096 * 2 + 2 * 4096 * 1024 + 3 * 4096 * 14336 + 2 * 4096) + 4096
    assert _gib(out, "params") == pytest.approx(4 * n_params / 8, rel=0.01)
    assert _gib(out, "optimizer") == pytest.approx(8 * n_params / 8, rel=0.01)  # Adam mu + nu
    assert _gib(out, "temp") > 0
    # ring attention: K/V blocks travel by collective-permute; sharded weights are all-gathered before use (at
    # least once per step: (P-1)/P of the fp32 params)
    assert _gib(out, "collective-permute") > 1e9
    assert _gib(out, "all-gather") >= 7 / 8 * 4 * n_params * 0.99
    assert r.returncode == 0 and "fits:" in out
    small = _plan([os.path.join(REPO, "configs", "llama_8b_128k.yaml"), "--devices", "8", "--memory-limit", "16GiB"])
    assert small.returncode == 1
    assert "does NOT fit" in small.stderr and "--memory-limit 16GiB" in small.stderr


def test_plan_tiny_fits_and_lowers_for_cuda():
    r = _plan([os.path.join(REPO, "configs", "smoke_cpu.yaml"), "--devices", "8", "--memory-limit", "1GiB",
               "--lower-for", "cuda"], timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "mesh data=2 x fsdp=1 x context=4 x tensor=1" in r.stdout and "fits:" in r.stdout
    assert _gib(r.stdout, "collective-permute") > 0  # ring attention over the context axis
    assert "lowered the train step for cuda" in r.stdout
