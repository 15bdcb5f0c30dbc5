"""The `longtrain` command line, run as a user runs it (subprocess): help, version, config, exit codes."""
import os
import subprocess
import sys

import yaml

from longtrain.config import from_dict, load_config


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "longtrain", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=120)


def test_help_and_version(tmp_path):
    out = run_cli("--help", cwd=tmp_path)
    assert out.returncode == 0 and "config" in out.stdout
    out = run_cli("--version", cwd=tmp_path)
    assert out.returncode == 0 and out.stdout.startswith("longtrain ")


def test_console_script_exists():
    import shutil

    exe = shutil.which("longtrain")
    assert exe is not None, "the longtrain console script is not on PATH"
    out = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0


def test_config_prints_resolved_yaml_that_loads_back(repo_root, tmp_path):
    path = os.path.join(repo_root, "configs", "smoke_cpu.yaml")
    out = run_cli("config", path, "optim.learning_rate=1e-4", "model.rope_scaling.type=linear",
                  "model.rope_scaling.factor=2", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    printed = yaml.safe_load(out.stdout)
    assert printed["optim"]["learning_rate"] == 1e-4
    expected = load_config(path, ["optim.learning_rate=1e-4", "model.rope_scaling.type=linear",
                                  "model.rope_scaling.factor=2"])
    assert from_dict(printed) == expected
    resolved = tmp_path / "resolved.yaml"
    resolved.write_text(out.stdout)
    again = run_cli("config", str(resolved), cwd=tmp_path)
    assert again.returncode == 0 and again.stdout == out.stdout


def test_config_errors_exit_2_with_message(repo_root, tmp_path):
    path = os.path.join(repo_root, "configs", "smoke_cpu.yaml")
    cases = [
        (["optim.lr=1"], ["optim.lr", "optim.learning_rate"]),
        (["model.num_layers=two"], ["model.num_layers", "two", "integer"]),
        (["mesh.data=3", "--devices", "8"], ["mesh product", "8 devices"]),
        (["model.num_kv_heads=3"], ["num_kv_heads=3", "divisible"]),
        (["noequals"], ["key=value"]),
    ]
    for overrides, must_contain in cases:
        out = run_cli("config", path, *overrides, cwd=tmp_path)
        assert out.returncode == 2, (overrides, out.stdout, out.stderr)
        for text in must_contain:
            assert text in out.stderr, (overrides, out.stderr)
        assert "Traceback" not in out.stderr
    missing = run_cli("config", str(tmp_path / "nope.yaml"), cwd=tmp_path)
    assert missing.returncode == 2 and "nope.yaml" in missing.stderr


def test_config_devices_flag_checks_another_mesh(repo_root, tmp_path):
    path = os.path.join(repo_root, "configs", "smoke_cpu.yaml")
    out = run_cli("config", path, "mesh.data=8", "mesh.context=8", "data.batch_size=8", "--devices", "64", cwd=tmp_path)
    assert out.returncode == 0, out.stderr


def test_local_launcher_sets_simulated_devices(repo_root, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    script = os.path.join(repo_root, "launch", "local.sh")
    config = os.path.join(repo_root, "configs", "smoke_cpu.yaml")
    ok = subprocess.run(["bash", script, "--devices", "4", "config", config, "mesh.data=-1"], capture_output=True,
                        text=True, env=env, cwd=tmp_path, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert yaml.safe_load(ok.stdout)["mesh"]["data"] == -1
    bad = subprocess.run(["bash", script, "--devices", "4", "config", config, "mesh.data=-1", "mesh.context=8"],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert bad.returncode == 2 and "cannot fill 4 devices" in bad.stderr  # the -1 is filled from the 4 devices


def test_config_needs_no_devices_to_print_a_config(repo_root, tmp_path):
    """On a one-device laptop, `longtrain config` checks the config against its own mesh (8 devices here)."""
    env = {**{k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}, "JAX_PLATFORMS": "cpu"}
    path = os.path.join(repo_root, "configs", "smoke_cpu.yaml")
    out = subprocess.run([sys.executable, "-m", "longtrain", "config", path], capture_output=True, text=True,
                         env=env, cwd=tmp_path, timeout=120)
    assert out.returncode == 0, out.stderr
    assert yaml.safe_load(out.stdout)["mesh"]["context"] == 4
    bad = subprocess.run([sys.executable, "-m", "longtrain", "config", path, "data.batch_size=3"],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert bad.returncode == 2 and "data.batch_size=3" in bad.stderr  # cross-field checks still run


def test_usage_shows_overrides_as_optional(repo_root, tmp_path):
    out = run_cli("train", cwd=tmp_path)
    assert out.returncode == 2
    assert "[key=value ...]" in out.stderr
    assert out.stderr.rstrip().endswith("the following arguments are required: config")


def test_overrides_may_follow_flags(repo_root, tmp_path):
    path = os.path.join(repo_root, "configs", "smoke_cpu.yaml")
    out = run_cli("config", path, "--devices", "8", "optim.learning_rate=0.5", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert yaml.safe_load(out.stdout)["optim"]["learning_rate"] == 0.5
    bad = run_cli("config", path, "--devices", "8", "--bogus", cwd=tmp_path)
    assert bad.returncode == 2 and "--bogus" in bad.stderr


CTRL_C_WHILE_COMPILING = """
import os, signal, sys
import longtrain.train.trainer as trainer

def train(config):  # stands in for a long compile: Ctrl-C arrives while no StopRequest handler is installed
    os.kill(os.getpid(), signal.SIGINT)
    raise AssertionError("not interrupted")

trainer.train = train
from longtrain.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_ctrl_c_outside_the_training_loop_is_one_line_exit_130(repo_root):
    cmd = [sys.executable, "-c", CTRL_C_WHILE_COMPILING, "train", os.path.join(repo_root, "configs", "smoke_cpu.yaml"),
           "--devices", "8"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 130, r.stderr[-2000:]
    assert r.stderr.strip() == "longtrain: interrupted"
