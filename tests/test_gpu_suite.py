"""benchmarks/gpu_suite.sh: on a machine without a GPU it says so and exits 0; its train part's overrides form a
valid config (a typo there would only show on the GPU machine, where time is scarce)."""
import os
import re
import shlex
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUITE = os.path.join(ROOT, "benchmarks", "gpu_suite.sh")


def test_suite_without_a_gpu_says_so_and_exits_0():
    r = subprocess.run(["bash", SUITE], cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "JAX_PLATFORMS": "cpu", "PYTHON": sys.executable})
    assert r.returncode == 0 and "no GPU present" in r.stdout, r.stdout + r.stderr


def test_suite_train_overrides_load_as_a_config():
    text = open(SUITE).read().replace("\\\n", " ")
    line = re.search(r"part train \d+ \$PY -m longtrain train (\S+) (.*)", text).group(1, 2)
    config_path, rest = line
    overrides = [a for a in shlex.split(rest) if "=" in a and "$out" not in a]
    r = subprocess.run([sys.executable, "-m", "longtrain", "config", config_path, *overrides, "--devices", "1"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "seq_len: 8192" in r.stdout and "source: synthetic" in r.stdout
