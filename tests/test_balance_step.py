"""Balance mode on 8 devices: executing a plan (micro-batches of different context degree c, split documents
zigzag over their group's ranks, ring attention with token_index=positions) gives the loss and gradient of the
single-device big packed batch; the trainer runs balance mode end to end and logs c per micro-batch."""
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
from test_balance_gradient import _loss_sum


def _config(**mesh):
    model = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=4,
                        num_kv_heads=2, max_position_embeddings=1024, attention_impl="reference")
    return Config(model=model, mesh=MeshConfig(data=8, context=1, **mesh))


def test_executed_plan_matches_one_big_batch():
    from longtrain import models
    from longtrain.train.balanced_step import BalancedStep

    config = _config()
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

    runner = BalancedStep(config)
    loss_sum, grads = runner.loss_and_grad_sums(params, micro)
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


def test_balance_mode_refuses_sharded_parameters():
    from longtrain.train.balanced_step import check_balance_config

    with pytest.raises(ConfigError, match="mesh.fsdp"):
        check_balance_config(_config(fsdp=2))


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
