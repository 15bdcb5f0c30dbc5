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


def test_local_sh_simulates_the_requested_devices():
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    cfg = os.path.join(REPO, "configs", "tiny_cpu.yaml")
    ok = subprocess.run(["bash", os.path.join(REPO, "launch", "local.sh"), "--devices", "4", "config", cfg,
                         "mesh.data=1"], env=env, capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    bad = subprocess.run(["bash", os.path.join(REPO, "launch", "local.sh"), "--devices", "4", "config", cfg],
                         env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "but 4 devices are visible" in bad.stderr


def test_cluster_scripts_autodetect_and_overlap_collectives():
    slurm = open(os.path.join(REPO, "launch", "slurm.sbatch")).read()
    assert "--distributed-auto" in slurm and "srun" in slurm
    assert "--xla_gpu_enable_latency_hiding_scheduler=true" in slurm
    tpu = open(os.path.join(REPO, "launch", "tpu_pod.sh")).read()
    assert "--distributed-auto" in tpu
