"""Launch scripts: valid bash, local.sh sets the simulated device count, the cluster scripts use jax.distributed
auto-detection and the collective-overlap flags. (The multi-process script runs for real in test_train_e2e.)"""
import os
import subprocess

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ["local.sh", "local_multiprocess.sh", "slurm.sbatch", "tpu_pod.sh"]


@pytest.mark.parametrize("name", SCRIPTS)
def test_script_is_valid_bash_and_executable(name):
    path = os.path.join(REPO, "launch", name)
    assert os.access(path, os.X_OK)
    assert subprocess.run(["bash", "-n", path]).returncode == 0


def test_cluster_scripts_autodetect_and_overlap_collectives():
    slurm = open(os.path.join(REPO, "launch", "slurm.sbatch")).read()
    assert "--distributed-auto" in slurm and "srun" in slurm
    assert "--xla_gpu_enable_latency_hiding_scheduler=true" in slurm
    tpu = open(os.path.join(REPO, "launch", "tpu_pod.sh")).read()
    assert "--distributed-auto" in tpu


def test_launch_uses_the_python_that_has_longtrain(tmp_path):
    """Started outside the virtual environment (a PATH whose python3 has no jax and no `longtrain` command), the
    launch scripts stop with a message naming LONGTRAIN_PYTHON instead of 'No module named jax'; with it set they
    run. (They use the `longtrain` command on PATH when there is one: its shebang names the right Python.)"""
    import sys

    cfg = os.path.join(REPO, "configs", "smoke_cpu.yaml")
    bare = {"PATH": "/usr/bin:/bin", "HOME": os.environ.get("HOME", "/tmp"), "JAX_PLATFORMS": "cpu"}
    for script in ("local.sh", "local_multiprocess.sh"):
        cmd = ["bash", os.path.join(REPO, "launch", script), "config", cfg]
        r = subprocess.run(cmd, env=bare, cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert r.returncode == 2, (script, r.stdout, r.stderr)
        assert "LONGTRAIN_PYTHON" in r.stderr and "No module named" not in r.stderr
    ok = subprocess.run(["bash", os.path.join(REPO, "launch", "local.sh"), "config", cfg],
                        env={**bare, "LONGTRAIN_PYTHON": sys.executable}, cwd=tmp_path, capture_output=True,
                        text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert "context: 4" in ok.stdout
