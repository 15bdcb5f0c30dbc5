"""One step path (issue 15, item 1): every train step executes a plan through `executor.StepExecutor`. The plain
step is the uniform plan of optim.grad_accum micro-batches at c = mesh.context, run fused (one program); running
the same plan micro-batch by micro-batch (the executor's general path, the one balance mode takes) gives the same
new state and metrics: the fast path is proven against the general one."""
import jax
import numpy as np
import pytest

from longtrain.config import load_config

TINY = ["model.vocab_size=256", "model.hidden_size=32", "model.intermediate_size=48", "model.num_heads=4",
        "model.num_kv_heads=2", "model.num_layers=2", "data.seq_len=64", "data.batch_size=4",
        "data.synthetic_lengths=long_tail", "train.steps=10", "optim.warmup_steps=0", "optim.chunk_size=24"]


def _steps(overrides, fused: bool, steps: int = 2):
    """(states, metrics) after `steps` steps from the same seed and data, on the fused or per-micro-batch path."""
    from longtrain.train.program import build_program
    from longtrain.train.setup import build_session

    config = load_config(None, TINY + overrides, num_devices=8)
    session = build_session(config)
    program = build_program(config, session)
    state = program.init(jax.random.PRNGKey(config.train.seed))
    metrics = []
    for _ in range(steps):
        plan = session.step_plan(next(session.dataset))
        assert len(plan["micro_batches"]) == config.optim.grad_accum and "stacked" in plan
        state, m = program.step(state, plan, fused=fused)
        metrics.append(jax.device_get(m))
    return jax.device_get(state), metrics


@pytest.mark.parametrize("overrides", [
    # ring attention over context=4 in the zigzag layout, 2 micro-batches per step
    ["mesh.data=2", "mesh.context=4", "mesh.context_strategy=ring", "mesh.layout=zigzag", "optim.grad_accum=2"],
    # SpaCO draws its chunk selection from the micro-batch's key: both paths must hand out the same keys
    ["mesh.data=8", "data.batch_size=16", "optim.mode=spaco", "optim.grad_accum=2"],
])
def test_fused_step_equals_the_plan_run_micro_batch_by_micro_batch(overrides):
    fused_state, fused_metrics = _steps(overrides, fused=True)
    plan_state, plan_metrics = _steps(overrides, fused=False)
    for got, want in zip(plan_metrics, fused_metrics):
        assert got["finite"] and want["finite"]
        np.testing.assert_allclose(got["loss"], want["loss"], rtol=1e-6)
        np.testing.assert_allclose(got["grad_norm"], want["grad_norm"], rtol=1e-5)
        assert got["num_targets"] == want["num_targets"]
    moved = 0.0
    for got, want in zip(jax.tree.leaves(plan_state), jax.tree.leaves(fused_state)):
        np.testing.assert_allclose(np.asarray(got, np.float64), np.asarray(want, np.float64), rtol=1e-5, atol=1e-7)
    params0, _ = _steps(overrides, fused=True, steps=0)
    for new, old in zip(jax.tree.leaves(fused_state["params"]), jax.tree.leaves(params0["params"])):
        moved = max(moved, float(np.max(np.abs(np.asarray(new) - np.asarray(old)))))
    assert moved > 1e-4  # two real updates happened (the comparison is not of untouched parameters)


def test_a_plain_batch_is_the_uniform_plan_of_its_micro_batches():
    """Row i*A + j of the batch is in micro-batch j, as `step.make_train_step` cuts it; the plan counts the whole
    step's targets and gives every micro-batch the mesh's context degree."""
    from longtrain.train.executor import uniform_plan

    rng = np.random.default_rng(0)
    batch = {k: rng.integers(0, 9, (6, 5)).astype(np.float32 if k == "loss_mask" else np.int32)
             for k in ("tokens", "targets", "loss_mask", "positions", "segment_ids")}
    plan = uniform_plan(batch, 3, context=4)
    assert [mb["context"] for mb in plan["micro_batches"]] == [4, 4, 4]
    for j, mb in enumerate(plan["micro_batches"]):
        np.testing.assert_array_equal(mb["tokens"], batch["tokens"][[j, j + 3]])
    assert plan["num_targets"] == float(batch["loss_mask"].sum())
    with pytest.raises(ValueError, match="grad_accum=4"):
        uniform_plan(batch, 4, context=1)
    with pytest.raises(KeyError, match="segment_ids"):
        uniform_plan({k: v for k, v in batch.items() if k != "segment_ids"}, 1, context=1)
