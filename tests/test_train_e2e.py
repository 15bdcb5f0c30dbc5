"""End-to-end trainer tests: real model, data, ring/zigzag runtime on 8 simulated devices, run as subprocesses
(`python -m longtrain train ...`) so kill -9, SIGTERM, exit codes and other device counts are real.

All runs share one persistent XLA compilation cache, so a program is compiled once per device count. The
reference run (uninterrupted) is the oracle for the resume tests: losses after a kill -9 + restart must equal it
bitwise; after a restore on 4 devices (different reductions) to 1e-5.
"""
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from longtrain.train.metrics import read_metrics

STEPS = 60
COMMON = [
    f"train.steps={STEPS}", "optim.warmup_steps=2", "optim.schedule=constant", "optim.learning_rate=3e-3",
    "data.seq_len=64", "data.batch_size=4", "train.eval_every=30", "train.eval_batches=1", "checkpoint.every=5",
    "checkpoint.keep=3", "logging.progress=plain",
]
QUIET = ["logging.wandb_mode=disabled"]
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _shared_dir(tmp_path_factory):
    """A folder shared by all pytest-xdist workers of this session (so the reference run happens once)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    cache = _shared_dir(tmp_path_factory) / "longtrain_xla_cache"
    cache.mkdir(exist_ok=True)
    e = dict(os.environ)
    e["JAX_COMPILATION_CACHE_DIR"] = str(cache)
    e["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    e["WANDB_MODE"] = "offline"
    e["JAX_PLATFORMS"] = "cpu"
    return e


def _cmd(repo_root, out_dir, extra=(), devices=None):
    cmd = [sys.executable, "-m", "longtrain", "train", os.path.join(repo_root, "configs", "smoke_cpu.yaml"),
           f"train.output_dir={out_dir}", *COMMON, *extra]
    return cmd + (["--devices", str(devices)] if devices else [])


def _run(cmd, env, timeout=240):
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def _committed(out_dir):
    d = os.path.join(out_dir, "checkpoints")
    return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []


def _wait_for(predicate, proc, timeout=180):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if predicate():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.05)
    return False


def _sigterm_after_step(cmd, env, out_dir, step, timeout=180):
    """Start `cmd`, send SIGTERM once its metrics show `step`; -> (process, stdout, stderr) after it exits."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert _wait_for(lambda: _last_step(out_dir) >= step, proc, timeout), "the run ended before SIGTERM"
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc, stdout, stderr


def _last_step(out_dir):
    path = os.path.join(out_dir, "metrics.jsonl")
    return max(read_metrics(path), default=0) if os.path.exists(path) else 0


@pytest.fixture(scope="module")
def reference(env, tmp_path_factory):
    """The uninterrupted 8-device run (once per session, shared by xdist workers through a file lock)."""
    from filelock import FileLock

    shared = _shared_dir(tmp_path_factory)
    out = str(shared / "train_reference")
    with FileLock(str(shared / "train_reference.lock")):
        if not os.path.exists(os.path.join(out, "stdout.txt")):
            r = _run(_cmd(REPO, out), env)
            assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
            with open(os.path.join(out, "stdout.txt"), "w") as f:
                f.write(r.stdout)
    return out, read_metrics(os.path.join(out, "metrics.jsonl")), open(os.path.join(out, "stdout.txt")).read()


def test_reference_run_learns_evaluates_logs_and_checkpoints(reference):
    out, losses, stdout = reference
    assert sorted(losses) == list(range(1, STEPS + 1))
    first = sum(losses[s]["loss"] for s in (1, 2, 3)) / 3
    last = sum(losses[s]["loss"] for s in (STEPS - 2, STEPS - 1, STEPS)) / 3
    assert last < first - 0.5, (first, last)
    rec = losses[STEPS]
    for key in ("grad_norm", "lr", "tokens_per_s", "step_time_s"):
        assert rec[key] > 0
    assert rec["mfu"] is None  # no peak FLOP/s for CPU
    evals = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl")) if '"eval"' in line]
    assert [e["step"] for e in evals] == [30, 60]
    assert all(0 <= e["eval_retrieval_accuracy"] <= 1 and e["eval_loss"] > 0 for e in evals)
    assert evals[1]["eval_loss"] < evals[0]["eval_loss"]
    assert _committed(out) == [50, 55, 60]  # keep the last 3
    assert not glob.glob(os.path.join(out, "checkpoints", "*tmp*"))
    runs = glob.glob(os.path.join(out, "wandb", "offline-run-*", "run-*.wandb"))
    assert len(runs) == 1
    blob = open(runs[0], "rb").read()
    assert b"grad_norm" in blob and b"eval_retrieval_accuracy" in blob
    assert "step 60 loss=" in stdout  # plain progress lines when stdout is not a TTY


def _pixels_of_color(image_HWC, hex_color, tol=0.02):
    rgb = [int(hex_color[i:i + 2], 16) / 255 for i in (1, 3, 5)]
    return int(((abs(image_HWC[..., :3] - rgb) < tol).all(axis=-1)).sum())


def test_reference_run_ends_with_a_summary_and_a_plot(reference):
    """The last lines say how the run ended (numbers equal to the last metrics records) and where things are;
    curves.png beside metrics.jsonl shows train loss, eval loss and retrieval accuracy."""
    import matplotlib.image

    out, losses, stdout = reference
    evals = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl")) if '"eval"' in line]
    summary = stdout[stdout.index("summary:"):]
    assert summary.startswith(f"summary: {STEPS} steps")
    assert f"final loss {losses[STEPS]['loss']:.4f}" in summary
    assert f"eval loss {evals[-1]['eval_loss']:.4f}" in summary
    assert f"retrieval accuracy {evals[-1]['eval_retrieval_accuracy']:.2f}" in summary
    assert "tokens/s" in summary
    png = os.path.join(out, "curves.png")
    for where in (os.path.join(out, "checkpoints"), os.path.join(out, "metrics.jsonl"), png):
        assert where in summary
    image = matplotlib.image.imread(png)
    assert image.shape[:2] == (640, 900)  # two panels: losses, and retrieval accuracy
    assert _pixels_of_color(image, "#1f77b4") > 200  # train loss (matplotlib's first line color)
    assert _pixels_of_color(image, "#ff7f0e") > 100  # eval loss
    assert _pixels_of_color(image, "#2ca02c") > 100  # retrieval accuracy


def test_kill9_then_restart_resumes_bitwise(repo_root, env, reference, tmp_path):
    _, ref, _ = reference
    out = str(tmp_path)
    cmd = _cmd(repo_root, out, QUIET)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        ok = _wait_for(lambda: any(s >= 10 for s in _committed(out)) and _last_step(out) >= 12, proc)
        assert ok, "run ended before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    killed_at = _last_step(out)
    assert killed_at < STEPS
    r = _run(cmd, env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from checkpoint step" in r.stdout
    got = read_metrics(os.path.join(out, "metrics.jsonl"))
    assert sorted(got) == list(range(1, STEPS + 1))
    for s in range(1, STEPS + 1):
        assert got[s]["loss"] == ref[s]["loss"], (s, got[s]["loss"], ref[s]["loss"])
        assert got[s]["grad_norm"] == ref[s]["grad_norm"], s
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    train_steps = [row["step"] for row in rows if row["kind"] == "train"]
    assert train_steps == list(range(1, STEPS + 1))  # the replayed steps replace the killed run's rows


HANG_IN_SAVE = """
import os, sys, time
import orbax.checkpoint._src.path.atomicity as atomicity
_orig = atomicity.AtomicRenameTemporaryPath.finalize
async def finalize(self):
    if self._final_path.name == "10":  # the save of step 10 never commits: the process dies inside it
        open(os.environ["HANG_MARKER"], "w").close()
        time.sleep(3600)
    return await _orig(self)
atomicity.AtomicRenameTemporaryPath.finalize = finalize
from longtrain.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_kill_during_async_save_resumes_from_previous_good_checkpoint(repo_root, env, reference, tmp_path):
    _, ref, _ = reference
    out = str(tmp_path / "run")
    marker = str(tmp_path / "hanging")
    cmd = _cmd(repo_root, out, QUIET)
    proc = subprocess.Popen([sys.executable, "-c", HANG_IN_SAVE, *cmd[3:]], env={**env, "HANG_MARKER": marker},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert _wait_for(lambda: os.path.exists(marker), proc), "the save of step 10 never started"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert _committed(out) == [5]
    assert glob.glob(os.path.join(out, "checkpoints", "10.orbax-checkpoint-tmp*"))  # the torn save
    r = _run(cmd, env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from checkpoint step 5 " in r.stdout
    assert not glob.glob(os.path.join(out, "checkpoints", "*tmp*"))
    got = read_metrics(os.path.join(out, "metrics.jsonl"))
    assert all(got[s]["loss"] == ref[s]["loss"] for s in range(6, STEPS + 1))


def test_restore_8_device_checkpoint_on_4_devices(repo_root, env, reference, tmp_path):
    ref_out, ref, _ = reference
    out = str(tmp_path / "run")
    shutil.copytree(os.path.join(ref_out, "checkpoints"), os.path.join(out, "checkpoints"))
    shutil.rmtree(os.path.join(out, "checkpoints", "60"))  # continue from step 55, written on 8 devices
    r = _run(_cmd(repo_root, out, [*QUIET, "mesh.data=1", "mesh.context=4", "train.eval_every=0"], devices=4),
             env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from checkpoint step 55 " in r.stdout
    got = read_metrics(os.path.join(out, "metrics.jsonl"))
    assert sorted(got) == list(range(56, STEPS + 1))
    for s in got:
        assert got[s]["loss"] == pytest.approx(ref[s]["loss"], rel=1e-5, abs=1e-6)


def _copy_checkpoints_corrupting_the_latest(ref_out, out, how):
    """The reference run's checkpoints (50, 55, 60) in `out`, with the array data files of step 60 corrupted
    (all of them: OCDBT keeps a process-local and a merged copy, and which one a read uses is orbax's business)."""
    shutil.copytree(os.path.join(ref_out, "checkpoints"), os.path.join(out, "checkpoints"))
    for path in glob.glob(os.path.join(out, "checkpoints", "60", "state", "**", "d", "*"), recursive=True):
        if how == "truncate":
            os.truncate(path, os.path.getsize(path) // 2)
        elif how == "delete":
            os.remove(path)
        else:
            data = bytearray(open(path, "rb").read())
            data[len(data) // 3] ^= 0x01
            open(path, "wb").write(bytes(data))


@pytest.mark.parametrize("how", ["truncate", "delete", "flip"])
def test_corrupt_latest_checkpoint_falls_back_and_continues_bitwise(repo_root, env, reference, tmp_path, how):
    ref_out, ref, _ = reference
    out = str(tmp_path / "run")
    _copy_checkpoints_corrupting_the_latest(ref_out, out, how)
    r = _run(_cmd(repo_root, out, [*QUIET, "train.steps=62"]), env)
    assert r.returncode == 0, r.stderr[-3000:]
    reports = [line for line in r.stderr.splitlines() if "is corrupt" in line]
    assert len(reports) == 1, r.stderr[-3000:]
    assert reports[0].startswith("longtrain: checkpoint step 60 is corrupt: state")
    assert reports[0].endswith("falling back to step 55")
    assert "Traceback" not in r.stderr
    assert "resumed from checkpoint step 55 " in r.stdout
    changed = [line for line in r.stderr.splitlines() if "changed settings" in line]
    assert len(changed) == 1 and changed[0].startswith("longtrain: resuming from step 55 with changed settings")
    assert "train.steps: 60 -> 62" in changed[0]
    assert os.path.isdir(os.path.join(out, "checkpoints", "corrupt", "60"))
    got = read_metrics(os.path.join(out, "metrics.jsonl"))
    assert sorted(got) == list(range(56, 63))
    for s in range(56, STEPS + 1):
        assert got[s]["loss"] == ref[s]["loss"], (s, got[s]["loss"], ref[s]["loss"])


def test_resume_refuses_a_changed_model_or_data_naming_the_keys(repo_root, env, reference, tmp_path):
    ref_out, _, _ = reference
    out = str(tmp_path / "run")
    shutil.copytree(os.path.join(ref_out, "checkpoints"), os.path.join(out, "checkpoints"))
    for extra, named in ((["model.hidden_size=128", "model.intermediate_size=384"],
                          ["model.hidden_size: 64 -> 128", "model.intermediate_size: 192 -> 384"]),
                         (["data.seq_len=128"], ["data.seq_len: 64 -> 128"])):
        r = _run(_cmd(repo_root, out, [*QUIET, *extra]), env, timeout=120)
        assert r.returncode == 2, r.stderr[-3000:]
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("longtrain: config error: cannot resume from checkpoint "
                                                       "step 60"), r.stderr[-3000:]
        assert all(n in lines[0] for n in named), lines[0]
    assert _committed(out) == [50, 55, 60]  # nothing moved or written


def test_sigterm_saves_and_exits_zero_and_profiles(repo_root, env, tmp_path):
    out = str(tmp_path)
    proc, stdout, stderr = _sigterm_after_step(_cmd(repo_root, out, [*QUIET, "train.profile_steps=[2,3]"]), env,
                                               out, 7)
    assert proc.returncode == 0, stderr[-3000:]
    stopped = _last_step(out)
    assert stopped < STEPS and "stopped by SIGTERM" in stdout
    assert _committed(out)[-1] == stopped  # a checkpoint of the last finished step
    assert glob.glob(os.path.join(out, "profile", "**", "*.xplane.pb"), recursive=True)  # trace of steps 2..3


def test_nan_steps_are_skipped_counted_and_stop_after_k_in_a_row(repo_root, env, tmp_path):
    out = str(tmp_path)
    r = _run(_cmd(repo_root, out, [*QUIET, "train.inject_nan_steps=[3,10,11,12]", "train.max_nonfinite_steps=3"]),
             env)
    assert r.returncode == 3, r.stderr[-3000:]
    got = read_metrics(os.path.join(out, "metrics.jsonl"))
    assert got[4]["skipped"] and got[4]["nonfinite_total"] == 1
    assert not got[5]["skipped"] and got[5]["nonfinite_run"] == 0 and got[9]["nonfinite_total"] == 1
    assert max(got) == 13 and got[13]["nonfinite_run"] == 3 and got[13]["nonfinite_total"] == 4
    assert "stopping at step 13" in r.stdout + r.stderr


def test_bad_config_key_exits_2_naming_it(repo_root, env, tmp_path):
    r = _run(_cmd(repo_root, str(tmp_path), ["optim.learning_rat=1e-3"]), env, timeout=60)
    assert r.returncode == 2 and "optim.learning_rat" in r.stderr and "learning_rate" in r.stderr
    r = _run(_cmd(repo_root, str(tmp_path), ["mesh.layout=spiral"]), env, timeout=60)
    assert r.returncode == 2 and "mesh.layout" in r.stderr


def test_missing_data_path_fails_before_compiling(repo_root, env, tmp_path):
    missing = str(tmp_path / "nope" / "*.jsonl")
    t0 = time.time()
    r = _run(_cmd(repo_root, str(tmp_path), [*QUIET, "data.source=jsonl", f"data.paths=[{missing}]"]), env,
             timeout=120)
    assert r.returncode == 2 and "data.paths" in r.stderr and "nope" in r.stderr
    assert "Compiling" not in r.stderr and not os.path.exists(os.path.join(tmp_path, "checkpoints"))
    assert time.time() - t0 < 60


def _two_process_launch(env, tmp_path, out, extra):
    """(command, environment) of launch/local_multiprocess.sh: 2 processes x 4 devices training into `out`."""
    e = {**env, "LONGTRAIN_LOG_DIR": str(tmp_path)}
    e["XLA_FLAGS"] = e.get("XLA_FLAGS", "").replace("--xla_force_host_platform_device_count=8", "")
    cmd = ["bash", os.path.join(REPO, "launch", "local_multiprocess.sh"), "--processes", "2",
           "--devices-per-process", "4", *_cmd(REPO, out, [*QUIET, *extra])[3:]]
    return cmd, e


@pytest.mark.multiprocess
def test_two_processes_of_4_devices_equal_one_process_of_8(env, reference, tmp_path):
    """launch/local_multiprocess.sh: jax.distributed on 127.0.0.1 with gloo; same losses as the 8-device run."""
    _, ref, _ = reference
    out = str(tmp_path / "run")
    cmd, e = _two_process_launch(env, tmp_path, out, ["train.eval_every=0"])
    cmd = [c if c != f"train.steps={STEPS}" else "train.steps=3" for c in cmd]
    r = _run(cmd, e, timeout=300)
    other = open(tmp_path / "longtrain_proc1.log").read() if os.path.exists(tmp_path / "longtrain_proc1.log") else ""
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:] + other[-3000:]
    got = read_metrics(os.path.join(out, "metrics.jsonl"))
    assert sorted(got) == [1, 2, 3]
    for s in got:
        assert got[s]["loss"] == pytest.approx(ref[s]["loss"], rel=1e-6), s
    assert _committed(out) == [3]


@pytest.mark.multiprocess
def test_two_processes_agree_on_falling_back_past_a_corrupt_checkpoint(env, reference, tmp_path):
    ref_out, ref, _ = reference
    out = str(tmp_path / "run")
    _copy_checkpoints_corrupting_the_latest(ref_out, out, "flip")
    cmd, e = _two_process_launch(env, tmp_path, out, ["train.eval_every=0", "train.steps=57"])
    r = _run(cmd, e, timeout=300)
    other = open(tmp_path / "longtrain_proc1.log").read() if os.path.exists(tmp_path / "longtrain_proc1.log") else ""
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:] + other[-3000:]
    assert "falling back to step 55" in r.stdout + r.stderr
    got = read_metrics(os.path.join(out, "metrics.jsonl"))
    assert sorted(got) == [56, 57]
    for s in got:
        assert got[s]["loss"] == pytest.approx(ref[s]["loss"], rel=1e-6), s


@pytest.mark.multiprocess
def test_sigterm_to_the_multiprocess_launcher_saves_and_exits_0(env, tmp_path):
    """SIGTERM to launch/local_multiprocess.sh reaches every process; each finishes its step and saves, and the
    script exits 0 like the trainer (not 143)."""
    out = str(tmp_path / "run")
    cmd, e = _two_process_launch(env, tmp_path, out, ["train.eval_every=0", "logging.every=1",
                                                      "checkpoint.every=1000"])
    proc, log, _ = _sigterm_after_step(cmd, e, out, 2, timeout=240)
    assert proc.returncode == 0, log[-3000:]
    saved = _committed(out)
    assert len(saved) == 1 and 2 <= saved[0] < STEPS, saved


@pytest.mark.slow
def test_the_readme_demo_learns_long_context_retrieval(env, tmp_path):
    """The README's demo command, as a user runs it (about 4 minutes on 2 cores): eval retrieval accuracy >= 0.9
    at the end (the key 1.8-3 context shards of 128 tokens before the question), a summary and curves.png."""
    out = str(tmp_path / "demo")
    r = _run([sys.executable, "-m", "longtrain", "train", os.path.join(REPO, "configs", "tiny_cpu.yaml"),
              "--devices", "8", f"train.output_dir={out}", *QUIET], env, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    evals = read_metrics(os.path.join(out, "metrics.jsonl"), kind="eval")
    final = evals[max(evals)]
    assert final["eval_retrieval_accuracy"] >= 0.9, {s: e["eval_retrieval_accuracy"] for s, e in evals.items()}
    assert f"retrieval accuracy {final['eval_retrieval_accuracy']:.2f}" in r.stdout
    assert os.path.exists(os.path.join(out, "curves.png")) and os.path.isdir(os.path.join(out, "hf"))
