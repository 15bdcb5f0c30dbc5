"""Balance mode on 8 devices: executing a plan (micro-batches of different context degree c, split documents
zigzag over their group's ranks, ring attention with token_index=positions) gives the loss and gradient of the
single-device big packed batch; the trainer runs balance mode end to end and logs c per micro-batch."""
import dataclasses
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from longtrain.config import Config, ConfigError, MeshConfig, ModelConfig
from longtrain.data.balance import schedule
from longtrain.data.packing import Document, best_fit_rows, count_targets, pack_rows, plan_to_batches
from longtrain.parallel.xla_warnings import capture_compile_warnings
from test_balance_gradient import _loss_sum


def _config(architecture="llama", **mesh):
    model = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=4,
                        num_kv_heads=2, max_position_embeddings=1024, attention_impl="reference")
    if architecture == "minimax":  # a tiny hybrid: lightning + softmax layers, 3 experts top-2 (ragged dispatch)
        model = dataclasses.replace(model, architecture="minimax", num_layers=2, num_experts=3, experts_per_token=2,
                                    layer_types=["linear_attention", "full_attention"], moe_impl="ragged",
                                    lightning_impl="reference")
    return Config(model=model, mesh=MeshConfig(data=8, context=1, **mesh))


@pytest.mark.parametrize("architecture", ["llama", "minimax"])
def test_executed_plan_matches_one_big_batch(architecture):
    from longtrain import models
    from longtrain.train.balance_views import ContextGroupViews
    from longtrain.train.executor import StepExecutor

    config = _config(architecture)
    params = jax.jit(lambda key: models.init(config.model, key))(jax.random.PRNGKey(0))
    rng = np.random.default_rng(1)
    R, C = 8, 48
    # 150 > C: split over >= 4 ranks; the short documents stay whole after the split region (some start inside it)
    lengths = np.array([150, 33, 20, 12, 9, 25, 5, 17, 8, 6, 7, 11, 3, 14, 9, 10, 4, 13, 22, 6, 9])
    docs = [Document.from_tokens(rng.integers(0, 64, n)) for n in lengths]
    n_targets = count_targets(docs)
    plan = schedule(lengths, R, C, "balanced")
    assert max(plan.context_degrees) >= 4 and len(set(plan.context_degrees)) >= 2, plan.describe()
    # the ring carries only the split region: whole documents on ranks of c > 1 groups attend locally
    assert any(mb.context > 1 and mb.split_region < C and any(mb.rank_docs) for mb in plan.micro_batches)
    micro = [dict(arrays, context=mb.context) for mb, arrays in zip(plan.micro_batches, plan_to_batches(plan, docs))]

    runner = StepExecutor(ContextGroupViews(config))
    with capture_compile_warnings() as warnings:  # every (c, C, S) program compiles inside
        loss_sum, grads = runner.loss_and_grad_sums(params, micro)
    # the embedding rows reach the [batch over data, seq over context] layout without replicating them first
    # (the table is gathered first when its embed dim is split over two mesh axes: models/attention_site.py)
    assert warnings.involuntary_rematerializations == []
    # ZeRO-3 over the pool: every gradient leaf whose embed dimension 8 divides comes back split 8 ways
    for g in jax.tree.leaves(grads):
        if config.model.hidden_size in g.shape:
            assert {s.data.size for s in g.addressable_shards} == {g.size // 8}, g.sharding
    loss_plan = float(loss_sum) / n_targets
    grad_plan = jax.tree.map(lambda g: np.asarray(g) / n_targets, grads)

    big_T = 256
    big = pack_rows(docs, best_fit_rows([len(d) for d in docs], big_T), big_T)
    loss_big, grad_big = jax.jit(jax.value_and_grad(
        lambda p: _loss_sum(config.model, p, big, n_targets, index_causal=False)))(params)
    np.testing.assert_allclose(loss_plan, float(loss_big), rtol=1e-5)
    for got, want in zip(jax.tree_util.tree_leaves(grad_plan), jax.tree_util.tree_leaves(grad_big)):
        scale = float(jnp.max(jnp.abs(want))) + 1e-12
        assert float(np.max(np.abs(got - np.asarray(want)))) / scale < 1e-4


@pytest.mark.parametrize("architecture", ["llama", "minimax"])
def test_one_balanced_update_with_zero3_state_equals_the_single_device_update(architecture):
    """The trainer's balance-mode state (ZeRO-3 over the pool: params and Adam moments split 8 ways) after one
    plan step equals one single-device AdamW step on the gradient of the big packed batch."""
    from longtrain import models
    from longtrain.data.balance import schedule as balance_schedule
    from longtrain.train.optim import make_optimizer
    from longtrain.train.program import build_program
    from longtrain.train.setup import build_session
    from longtrain.train.step import apply_gradients, init_state

    config = _config(architecture)
    config.data.balance.enabled = True
    config.optim.warmup_steps = 0
    config.optim.eps = 1e-4  # Adam's first step is ~lr * g / (|g| + eps): keep it smooth where |g| is tiny
    session = build_session(config, with_data=False)
    program = build_program(config, session)
    state = program.init(jax.random.PRNGKey(0))
    embedding = state["params"]["embed"]["embedding"]
    assert {s.data.size for s in embedding.addressable_shards} == {embedding.size // 8}
    mu = jax.tree.leaves(state["opt_state"])[1]
    assert len({s.data.size for s in mu.addressable_shards}) == 1 and mu.addressable_shards[0].data.size < mu.size
    params0 = jax.device_get(state["params"])

    rng = np.random.default_rng(2)
    lengths = np.array([150, 33, 20, 12, 9, 25, 5, 17, 8, 6, 7, 11, 3, 14, 9, 10, 4, 13, 22, 6, 9])
    docs = [Document.from_tokens(rng.integers(0, 64, n)) for n in lengths]
    plan = balance_schedule(lengths, 8, 48, "balanced")
    micro = [dict(a, context=mb.context) for mb, a in zip(plan.micro_batches, plan_to_batches(plan, docs))]
    n_targets = count_targets(docs)
    new_state, _ = program.step(state, {"micro_batches": micro, "num_targets": n_targets})

    big = pack_rows(docs, best_fit_rows([len(d) for d in docs], 256), 256)
    optimizer, sched = make_optimizer(config.optim, config.train.steps, params0,
                                      models.param_logical_axes(config.model))
    loss_sum, grads = jax.value_and_grad(lambda p: _loss_sum(config.model, p, big, 1, index_causal=False))(params0)
    want, _ = apply_gradients(init_state(params0, optimizer, config.train.seed), loss_sum, grads,
                              jnp.float32(n_targets), optimizer, sched)
    for got, ref, old in zip(jax.tree.leaves(jax.device_get(new_state["params"])), jax.tree.leaves(want["params"]),
                             jax.tree.leaves(params0)):
        moved = float(np.max(np.abs(np.asarray(ref) - np.asarray(old))))
        assert moved > 0 and float(np.max(np.abs(np.asarray(got) - np.asarray(ref)))) <= 1e-3 * moved


def test_balance_mode_refuses_tensor_parallelism_by_name():
    from longtrain.train.balance_views import check_balance_config

    with pytest.raises(ConfigError, match="mesh.tensor=1 .got mesh.tensor=2"):
        check_balance_config(Config(model=_config().model, mesh=MeshConfig(data=4, context=1, tensor=2)))


@pytest.mark.parametrize("key,value", [("context_strategy", "token_ring"), ("layout", "contiguous"),
                                       ("lightning_variant", "ring")])
def test_balance_mode_refuses_a_context_setting_it_would_ignore(key, value):
    from longtrain.train.balance_views import check_balance_config

    with pytest.raises(ConfigError, match=f"mesh.{key}='{value}'"):
        check_balance_config(Config(model=_config().model, mesh=MeshConfig(data=8, context=1, **{key: value})))


def test_views_of_every_context_degree_hold_the_same_parameter_blocks():
    """Switching c between micro-batches moves no parameter bytes: the ZeRO-3 shardings of the views
    data=8/c x context=c are equivalent, and putting the parameters on another view returns the same buffers."""
    from longtrain import models
    from longtrain.train.balance_views import ContextGroupViews

    config = _config(fsdp=1)
    runner = ContextGroupViews(config)
    params = jax.jit(lambda key: models.init(config.model, key))(jax.random.PRNGKey(0))
    on = {1: jax.device_put(params, runner.param_shardings(1))}
    for c in (2, 4, 8):  # as loss_and_grad_sums moves them when the next micro-batch has another degree
        on[c] = jax.device_put(on[c // 2], runner.param_shardings(c))
    split = 0
    for leaves in zip(*(jax.tree.leaves(on[c]) for c in (1, 2, 4, 8))):
        first = leaves[0]
        split += {s.data.size for s in first.addressable_shards} == {first.size // 8}
        for other in leaves[1:]:
            assert other.sharding.is_equivalent_to(first.sharding, first.ndim)
            assert ([s.data.unsafe_buffer_pointer() for s in other.addressable_shards]
                    == [s.data.unsafe_buffer_pointer() for s in first.addressable_shards])
    assert split >= len(jax.tree.leaves(params)) - 1  # all but the tiny leaves are split over the 8 devices


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BALANCE_RUN = ["train", "configs/smoke_cpu.yaml", "data.balance.enabled=true", "mesh.data=8", "mesh.context=1",
               "data.synthetic_lengths=long_tail", "data.seq_len=128", "model.num_layers=1", "train.steps=3",
               "optim.warmup_steps=1", "train.eval_every=0", "train.export_hf=false", "checkpoint.enabled=false",
               "logging.every=1", "logging.wandb_mode=disabled", "logging.progress=plain"]


def _train_losses(out) -> list[float]:
    records = [json.loads(line) for line in open(out / "metrics.jsonl")]
    return [r["loss"] for r in records if r.get("kind") == "train"]


def test_trainer_runs_balance_mode(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "longtrain", *BALANCE_RUN, "--devices", "8", f"train.output_dir={out}"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text[-3000:]
    plans = [line for line in text.splitlines() if "micro-batch(es) [" in line]
    assert len(plans) == 3 and all("c=" in p for p in plans), text[-3000:]
    losses = _train_losses(out)
    assert len(losses) == 3 and all(np.isfinite(losses)), losses
    (tmp_path / "losses.json").write_text(json.dumps(losses))


def test_trainer_runs_balance_mode_with_a_hybrid_moe_model(tmp_path):
    """The MiniMax hybrid (a softmax and a lightning layer, 2 experts) trains in balance mode end to end."""
    out = tmp_path / "run"
    hybrid = ["model.architecture=minimax", "model.num_layers=2", "model.num_experts=2", "model.experts_per_token=1",
              "model.moe_impl=dense"]
    cmd = [sys.executable, "-m", "longtrain", *BALANCE_RUN, *hybrid, "--devices", "8", f"train.output_dir={out}"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text[-3000:]
    plans = [line for line in text.splitlines() if "micro-batch(es) [" in line]
    assert len(plans) == 3 and any("c=1 " not in p for p in plans), text[-3000:]  # some documents split
    losses = _train_losses(out)
    assert len(losses) == 3 and all(np.isfinite(losses)), losses


@pytest.mark.multiprocess
def test_balance_mode_two_processes_read_their_share_and_equal_one_process(tmp_path):
    """2 processes x 4 devices (jax.distributed, gloo): each process builds only its 4 ranks' rows of every
    micro-batch (the plan is global), and the losses equal the 1-process 8-device run."""
    one = tmp_path / "one"
    r = subprocess.run([sys.executable, "-m", "longtrain", *BALANCE_RUN, "--devices", "8",
                        f"train.output_dir={one}"], cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    two = tmp_path / "two"
    env = {**os.environ, "LONGTRAIN_LOG_DIR": str(tmp_path)}
    env["XLA_FLAGS"] = env.get("XLA_FLAGS", "").replace("--xla_force_host_platform_device_count=8", "")
    r = subprocess.run(["bash", os.path.join(ROOT, "launch", "local_multiprocess.sh"), "--processes", "2",
                        "--devices-per-process", "4", *BALANCE_RUN, f"train.output_dir={two}"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    other = (tmp_path / "longtrain_proc1.log").read_text() if (tmp_path / "longtrain_proc1.log").exists() else ""
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:] + other[-3000:]
    want, got = _train_losses(one), _train_losses(two)
    assert len(got) == 3 and got == pytest.approx(want, rel=1e-5), (got, want)


def test_balance_mode_with_zero3_state_resumes_bitwise_after_kill9(tmp_path):
    """kill -9 of a balance-mode run (ZeRO-3 state over the pool) and a restart: the resumed run's losses equal
    the uninterrupted run's, step for step, bitwise."""
    import signal
    import time

    steps = ["train.steps=8", "checkpoint.enabled=true", "checkpoint.every=2", "checkpoint.async_save=false"]
    run = [a for a in BALANCE_RUN if not a.startswith(("train.steps=", "checkpoint.enabled="))] + steps
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    ref = tmp_path / "ref"
    r = subprocess.run([sys.executable, "-m", "longtrain", *run, "--devices", "8", f"train.output_dir={ref}"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "longtrain", *run, "--devices", "8", f"train.output_dir={out}"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        t0 = time.time()
        while time.time() - t0 < 240 and proc.poll() is None:
            done = [int(n) for n in os.listdir(out / "checkpoints") if n.isdigit()] if (out / "checkpoints").is_dir() \
                else []
            if any(s >= 4 for s in done) and len(_train_losses(out) if (out / "metrics.jsonl").exists() else []) >= 5:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert len(_train_losses(out)) < 8
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert "resumed from checkpoint step" in r.stdout
    records = [json.loads(line) for line in open(out / "metrics.jsonl")]
    got = {rec["step"]: rec["loss"] for rec in records if rec.get("kind") == "train"}
    want = {rec["step"]: rec["loss"] for rec in map(json.loads, open(ref / "metrics.jsonl"))
            if rec.get("kind") == "train"}
    assert sorted(got) == list(range(1, 9)) and got == want
