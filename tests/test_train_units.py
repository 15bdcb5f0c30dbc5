"""Unit tests of the trainer pieces that need no model: schedule, weight-decay mask, the train step's
accumulation / global normalisation / NaN skip (on a tiny softmax-regression model), FLOPs counting, peak table,
HLO collective bytes."""
import glob
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from longtrain.config import ModelConfig, OptimConfig
from longtrain.parallel import hlo_comm
from longtrain.train import metrics, optim, step


def test_schedule_warmup_then_cosine_to_floor():
    cfg = OptimConfig(learning_rate=1e-3, warmup_steps=10, schedule="cosine", min_lr_ratio=0.1)
    s = optim.learning_rate_schedule(cfg, total_steps=110)
    for c in [0, 3, 9]:
        assert float(s(c)) == pytest.approx(1e-3 * (c + 1) / 10, rel=1e-6)
    for c in [10, 35, 60, 109, 110, 500]:
        p = min(max((c - 10) / 100, 0), 1)
        want = 1e-4 + (1e-3 - 1e-4) * 0.5 * (1 + math.cos(math.pi * p))
        assert float(s(c)) == pytest.approx(want, rel=1e-5)
    lin = optim.learning_rate_schedule(OptimConfig(learning_rate=2.0, warmup_steps=0, schedule="linear",
                                                   min_lr_ratio=0.5), total_steps=10)
    assert [round(float(lin(c)), 5) for c in (0, 5, 10)] == [2.0, 1.5, 1.0]


def test_weight_decay_mask_skips_norms_and_biases_even_when_stacked():
    params = {"w": jnp.ones((4, 3, 5)), "norm": jnp.ones((4, 3)), "bias": jnp.ones((3,)), "emb": jnp.ones((7, 3))}
    axes = {"w": ("layers", "embed", "mlp"), "norm": ("layers", "embed"), "bias": ("mlp",), "emb": ("vocab", "embed")}
    mask = optim.weight_decay_mask(params, axes)
    assert mask == {"w": True, "norm": False, "bias": False, "emb": True}
    # with zero gradients AdamW only decays: decayed leaves shrink by lr*wd, the others stay put
    cfg = OptimConfig(learning_rate=0.1, warmup_steps=0, schedule="constant", weight_decay=0.5, grad_clip=None)
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)
    tx, _ = optim.make_optimizer(cfg, 10, params, axes)
    updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
    new = optax.apply_updates(params, updates)
    for k, decayed in mask.items():
        want = params[k] * (1 - 0.1 * 0.5) if decayed else params[k]
        np.testing.assert_allclose(new[k], want, rtol=1e-6)


def _toy_problem(seed=0, B=8, T=6, V=11, E=5):
    rng = np.random.default_rng(seed)
    params = {"emb": jnp.asarray(rng.normal(size=(V, E)), jnp.float32),
              "head": jnp.asarray(rng.normal(size=(E, V)), jnp.float32)}
    tokens = rng.integers(0, V, (B, T))
    mask = (rng.random((B, T)) < 0.6).astype(np.float32)
    mask[0] = 0.0  # an empty row: normalisation must still be global
    batch = {"tokens": jnp.asarray(tokens, jnp.int32), "targets": jnp.asarray(np.roll(tokens, -1, 1), jnp.int32),
             "loss_mask": jnp.asarray(mask)}

    def token_losses(p, b):
        logits = p["emb"][b["tokens"]] @ p["head"]
        return optax.softmax_cross_entropy_with_integer_labels(logits, b["targets"]) * b["loss_mask"]

    def micro(p, b, rng_key):
        return jax.value_and_grad(lambda q: jnp.sum(token_losses(q, b)))(p)

    def global_mean(p):
        return jnp.sum(token_losses(p, batch)) / jnp.sum(batch["loss_mask"])

    return params, batch, micro, global_mean


@pytest.mark.parametrize("accum", [1, 2, 4])
def test_step_accumulation_is_globally_normalised(accum):
    params, batch, micro, global_mean = _toy_problem()
    sgd = optax.sgd(0.1)
    fn = jax.jit(step.make_train_step(micro, sgd, lambda c: 0.1, grad_accum=accum))
    new_state, m = fn(step.init_state(params, sgd, 0), batch)
    want_loss, want_grads = jax.value_and_grad(global_mean)(params)
    np.testing.assert_allclose(m["loss"], want_loss, rtol=1e-5)
    np.testing.assert_allclose(m["grad_norm"], optax.tree.norm(want_grads), rtol=1e-5)
    want_params = jax.tree.map(lambda p, g: p - 0.1 * g, params, want_grads)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), new_state["params"],
                 want_params)
    assert int(new_state["step"]) == 1


def test_step_skips_and_counts_a_nan_batch():
    params, batch, micro, _ = _toy_problem()
    nan_batch = {**batch, "loss_mask": batch["loss_mask"].at[3, 2].set(jnp.nan)}
    tx = optax.adam(0.1)
    fn = jax.jit(step.make_train_step(micro, tx, lambda c: 0.1))
    state = step.init_state(params, tx, 0)
    state, m0 = fn(state, batch)
    before = jax.tree.map(np.asarray, state)
    state, m1 = fn(state, nan_batch)
    assert not bool(m1["finite"]) and int(m1["nonfinite_run"]) == 1 and int(m1["nonfinite_total"]) == 1
    jax.tree.map(np.testing.assert_array_equal, {k: before[k] for k in ("params", "opt_state")},
                 {k: state[k] for k in ("params", "opt_state")})
    state, m2 = fn(state, nan_batch)
    assert int(m2["nonfinite_run"]) == 2
    state, m3 = fn(state, batch)
    assert bool(m3["finite"]) and int(m3["nonfinite_run"]) == 0 and int(m3["nonfinite_total"]) == 2
    assert int(state["step"]) == 4 and int(state["opt_state"][0].count) == 2  # two updates really applied


def test_document_flops_count_documents_not_rows():
    rng = np.random.default_rng(1)
    seg = np.zeros((3, 40), np.int32)
    for r in range(3):
        cuts = np.sort(rng.choice(np.arange(1, 35), 3, replace=False))
        bounds = [0, *cuts, 35]
        for i in range(len(bounds) - 1):
            seg[r, bounds[i]:bounds[i + 1]] = i + 1
    seg = seg[:, rng.permutation(40)]  # layout order must not matter
    lengths = metrics.document_lengths(seg)
    assert lengths.sum() == 3 * 35 and len(lengths) == 12
    for window in (None, 4):
        brute = sum(sum(min(i + 1, window or 10**9) for i in range(L)) for L in lengths)
        assert metrics.causal_pairs(lengths, window).sum() == brute
    m = ModelConfig(hidden_size=64, num_heads=4, num_kv_heads=2, intermediate_size=96, num_layers=2, vocab_size=100)
    d = 16
    want = 6 * (2 * (64 * 64 + 2 * 64 * 32 + 64 * 64 + 3 * 64 * 96) + 64 * 100) * 105 \
        + 12 * d * 4 * 2 * sum(L * (L + 1) / 2 for L in lengths)
    assert metrics.train_flops(m, seg) == pytest.approx(want)


def test_peak_table():
    assert metrics.peak_flops_per_device("NVIDIA H100 80GB HBM3") == ("H100", 989e12)
    assert metrics.peak_flops_per_device("TPU v5 lite")[0] == "TPU v5e"
    assert metrics.peak_flops_per_device("TPU v5p")[0] == "TPU v5p"
    assert metrics.peak_flops_per_device("NVIDIA B200")[0] == "B200"
    assert metrics.peak_flops_per_device("cpu") is None


def test_hlo_collective_bytes_with_loop_trip_counts():
    mesh = jax.make_mesh((8,), ("d",))
    from jax.sharding import NamedSharding, PartitionSpec as P

    trips, width = 5, 96

    def f(x):
        def body(c, _):
            return jax.lax.ppermute(c, "d", [(i, (i + 1) % 8) for i in range(8)]) * 1.5, None
        y, _ = jax.lax.scan(body, x, None, length=trips)
        return jax.lax.psum(y, "d"), jax.lax.all_gather(y, "d")

    g = jax.jit(jax.shard_map(f, mesh=mesh, in_specs=P("d"), out_specs=(P(), P()), check_vma=False))
    x = jax.device_put(jnp.asarray(np.random.default_rng(0).normal(size=(8, width)), jnp.float32),
                       NamedSharding(mesh, P("d")))
    got = hlo_comm.collective_bytes(g.lower(x).compile().as_text(), 8)
    assert got["collective-permute"] == trips * width * 4
    assert got["all-reduce"] == pytest.approx(2 * 7 / 8 * width * 4)
    assert got["all-gather"] == pytest.approx(7 / 8 * 8 * width * 4)


def test_wandb_mode_auto(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    assert metrics.resolve_wandb_mode("auto") == "offline"  # no API key: never try the network
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert metrics.resolve_wandb_mode("auto") == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert metrics.resolve_wandb_mode("auto") == "disabled"
    assert metrics.resolve_wandb_mode("offline") == "offline"


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # free once the socket closes: nothing listens there


def test_wandb_with_a_key_and_no_network_logs_offline_at_once(monkeypatch, tmp_path):
    """The issue's case: an API key and no network. wandb itself would block ~90 s and raise."""
    import time

    from longtrain.config import Config

    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{_closed_port()}")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    config = Config()
    config.train.output_dir = str(tmp_path)
    warnings = []
    t0 = time.perf_counter()
    sink = metrics.WandbSink(config, {"a": 1}, warn=warnings.append)
    try:
        assert sink.mode == "offline" and sink.run is not None
        sink.log({"loss": 1.5}, step=1)
    finally:
        sink.close()
    assert time.perf_counter() - t0 < 30
    assert len(warnings) == 1 and "unreachable" in warnings[0] and "logging offline" in warnings[0]
    assert glob.glob(str(tmp_path / "wandb" / "offline-run-*"))


def test_wandb_online_init_failure_falls_back_to_offline(monkeypatch, tmp_path):
    """The server answers but login or init fails (bad key, server error): offline with one warning."""
    import wandb

    from longtrain.config import Config

    real_init = wandb.init

    def init(*args, mode=None, **kwargs):
        if mode == "online":
            raise wandb.errors.CommError("invalid API key\nmore detail")
        return real_init(*args, mode=mode, **kwargs)

    monkeypatch.setattr(wandb, "init", init)
    monkeypatch.setattr(metrics, "wandb_unreachable", lambda url, timeout_s=3.0: None)
    config = Config()
    config.train.output_dir = str(tmp_path)
    config.logging.wandb_mode = "online"
    warnings = []
    sink = metrics.WandbSink(config, {}, warn=warnings.append)
    sink.close()
    assert sink.mode == "offline"
    assert warnings == [f"longtrain: wandb: online init failed (CommError: invalid API key); logging offline to "
                        f"{tmp_path / 'wandb'} (upload later with `wandb sync`)"]


TWO_CTRL_C = """
import os, signal, sys, time
from longtrain.train.signals import StopRequest
with StopRequest() as stop:
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(0.2)
    assert stop.requested == "SIGINT", stop.requested
    print("first Ctrl-C: stop requested", flush=True)
    os.kill(os.getpid(), signal.SIGINT)  # the second kills at once, whatever the main thread is doing
    time.sleep(30)
print("still alive", flush=True)
"""


def test_second_ctrl_c_kills_at_once():
    import signal
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-c", TWO_CTRL_C], capture_output=True, text=True, timeout=20)
    assert r.returncode == -signal.SIGINT, (r.returncode, r.stdout, r.stderr)
    assert "first Ctrl-C: stop requested" in r.stdout and "still alive" not in r.stdout
    assert "Ctrl-C again kills at once" in r.stderr


def test_metrics_file_drops_rows_after_the_resumed_step(tmp_path):
    path = str(tmp_path / "metrics.jsonl")
    first = metrics.MetricsFile(path)
    for s in range(1, 8):
        first.write({"kind": "train", "step": s, "loss": float(s)})
    first.write({"kind": "eval", "step": 5, "eval_loss": 1.0})
    first.close()
    with open(path, "a") as f:
        f.write('{"kind": "train", "st')  # a line cut short by kill -9
    resumed = metrics.MetricsFile(path, keep_through_step=5)
    for s in (6, 7):
        resumed.write({"kind": "train", "step": s, "loss": 10.0 * s})
    resumed.close()
    rows = [json.loads(line) for line in open(path)]
    assert [(r["kind"], r["step"]) for r in rows] == [("train", s) for s in range(1, 6)] + [
        ("eval", 5), ("train", 6), ("train", 7)]
    assert metrics.read_metrics(path)[7]["loss"] == 70.0


def test_progress_is_plain_lines_off_a_tty(capsys):
    from longtrain.train.progress import NoProgress, PlainProgress, make_progress

    p = make_progress("auto", total=10, start=0, is_main_process=True)
    assert isinstance(p, PlainProgress)  # pytest captures stdout: not a TTY
    p.update({"step": 5, "loss": 1.25, "lr": 1e-3, "skipped": False})
    assert "step 5 loss=1.2500 lr=1.00e-03 eta=" in capsys.readouterr().out
    assert isinstance(make_progress("bar", 10, 0, is_main_process=False), NoProgress)


def test_progress_bar_keeps_counter_bar_and_eta_on_an_80_column_terminal():
    import io

    from rich.console import Console

    from longtrain.train.progress import BarProgress

    record = dict(step=37, loss=1.2345, grad_norm=0.5, lr=3e-3, tokens_per_s=12345.0, step_time_s=0.123, mfu=None)
    for width in (80, 140):
        bar = BarProgress(300, 0, console=Console(file=io.StringIO(), width=width))
        bar.update(record)
        bar.close()
        screen = Console(file=io.StringIO(), width=width, record=True)
        screen.print(bar._progress.get_renderable())
        (line,) = screen.export_text().splitlines()
        assert len(line) <= width
        assert line.startswith("train  37/300 ━") and " eta " in line and "loss=1.2345" in line
        assert ("step_time_s=0.123" in line) == (width >= 140)  # what does not fit is cut, not the bar
