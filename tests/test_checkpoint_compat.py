"""Checkpoints written before the models became Flax NNX modules restore: the module state has the same keys,
shapes and dtypes as the nested-dict parameters had, and the trainer resumes such a checkpoint (checksums verified)."""
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp

from longtrain import models
from longtrain.config import load_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE = os.path.join(REPO, "tests", "data", "pre_nnx_checkpoint")
OVERRIDES = ["model.hidden_size=16", "model.intermediate_size=32", "model.num_heads=2", "model.num_kv_heads=1",
             "data.seq_len=32", "data.batch_size=2", "optim.warmup_steps=1", "checkpoint.every=2",
             "checkpoint.keep=1", "train.eval_every=0", "train.export_hf=false", "mesh.data=2", "mesh.context=1",
             "logging.wandb_mode=disabled", "logging.progress=plain"]


def test_pre_nnx_checkpoint_params_match_the_module_state():
    """The saved parameter tree (read with orbax alone, no model code) has exactly the module state's keys,
    shapes and dtypes."""
    config = load_config(os.path.join(REPO, "configs", "smoke_cpu.yaml"), OVERRIDES, num_devices=2)
    saved = ocp.StandardCheckpointer().metadata(os.path.join(FIXTURE, "checkpoints", "4", "state"))
    saved_params = saved.item_metadata["params"] if hasattr(saved, "item_metadata") else saved["params"]
    ours = jax.eval_shape(lambda: models.init(config.model, jax.random.key(0)))
    flat_saved = {jax.tree_util.keystr(p): (tuple(m.shape), np.dtype(m.dtype))
                  for p, m in jax.tree_util.tree_leaves_with_path(saved_params)}
    flat_ours = {jax.tree_util.keystr(p): (tuple(a.shape), np.dtype(a.dtype))
                 for p, a in jax.tree_util.tree_leaves_with_path(ours)}
    assert flat_ours == flat_saved


def test_trainer_resumes_a_pre_nnx_checkpoint(tmp_path):
    out = tmp_path / "run"
    shutil.copytree(os.path.join(FIXTURE, "checkpoints"), out / "checkpoints")
    env = dict(os.environ, JAX_PLATFORMS="cpu", WANDB_MODE="disabled")
    cmd = [sys.executable, "-m", "longtrain", "train", os.path.join(REPO, "configs", "smoke_cpu.yaml"),
           f"train.output_dir={out}", "train.steps=6", *OVERRIDES, "--devices", "2"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not (out / "checkpoints" / "corrupt").exists(), proc.stderr  # its checksums verified
    with open(out / "metrics.jsonl") as f:
        steps = [r for r in map(json.loads, f) if "loss" in r]
    assert [r["step"] for r in steps] == [5, 6]  # continued from step 4, not from scratch
    assert all(np.isfinite(r["loss"]) for r in steps)
