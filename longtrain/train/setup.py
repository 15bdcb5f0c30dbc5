"""Everything the loop needs that comes from other parts of longtrain, built from the config in one place:
mesh + runtime (`longtrain.parallel`), the data iterators (`longtrain.data`), parameter shardings from the
models' logical axes, batch placement across processes, the synthetic task's scorer and the HF export.

`build_session(config, with_data=True)` validates in the order a user wants: config rules and the mesh first,
then the data sources (a missing path fails here, before anything is compiled).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from longtrain.config import Config, ConfigError, resolve_mesh_shape
from longtrain.train.step import BATCH_KEYS, require_batch_keys


@dataclasses.dataclass
class Session:
    config: Config
    mesh: jax.sharding.Mesh
    runtime: Any                     # None -> models use their LocalRuntime (one device)
    logical_axes: Any
    param_shardings: Any
    dataset: Any = None              # iterator of host batches with get_state()/set_state()
    eval_dataset_factory: Callable[[], Any] | None = None
    score_fn: Callable[[np.ndarray, dict], dict] | None = None  # data.score_answers for the synthetic task
    layout_perm: np.ndarray | None = None  # layout position -> natural token index (zigzag/striped context)

    @property
    def batch_sharding(self) -> NamedSharding:
        from longtrain import parallel

        return parallel.batch_sharding(self.mesh)  # rows over data x fsdp, sequence over context

    def init_params(self, key):
        from longtrain import models

        return models.init(self.config.model, key)

    def state_shardings(self, optimizer: optax.GradientTransformation, abstract_params: Any) -> dict:
        """Shardings of the train state: optimizer moments like their parameters, counters replicated."""
        replicated = NamedSharding(self.mesh, P())
        abstract_opt = jax.eval_shape(optimizer.init, abstract_params)
        opt = optax.tree_map_params(optimizer, lambda _, s: s, abstract_opt, self.param_shardings,
                                    transform_non_params=lambda _: replicated)
        return {"params": self.param_shardings, "opt_state": opt, "step": replicated, "rng": replicated,
                "nonfinite_run": replicated, "nonfinite_total": replicated}

    def put_batch(self, host_batch: dict) -> dict:
        """Global host batch (numpy [B, T], natural token order) -> sharded device arrays in the mesh's sequence
        layout. Every process holds the same global batch and hands each of its devices only that device's block,
        so N processes compute exactly what one process with all devices computes."""
        require_batch_keys(host_batch)
        sharding = self.batch_sharding
        out = {}
        for k in BATCH_KEYS:
            x = np.asarray(host_batch[k])
            if self.layout_perm is not None:
                x = x[:, self.layout_perm]
            out[k] = jax.make_array_from_callback(x.shape, sharding, lambda index, x=x: x[index])
        return out

    def step_plan(self, host_batch: dict) -> dict:
        """The plan the step executes (`executor.py`): the balance loader yields one; a plain batch is the uniform
        plan of optim.grad_accum micro-batches at c = mesh.context."""
        if "micro_batches" in host_batch:
            return host_batch
        from longtrain.train.executor import uniform_plan

        return uniform_plan(host_batch, self.config.optim.grad_accum, self.mesh.shape["context"])

    def abstract_batch(self) -> dict:
        d = self.config.data
        dtypes = {"loss_mask": jnp.float32}
        return {k: jax.ShapeDtypeStruct((d.batch_size, d.seq_len), dtypes.get(k, jnp.int32),
                                        sharding=self.batch_sharding) for k in BATCH_KEYS}

    def make_eval_dataset(self):
        if self.eval_dataset_factory is None:
            raise ConfigError("train.eval_every > 0 needs an eval data set, but none was built")
        return self.eval_dataset_factory()

    def export_hf(self, params: Any) -> str:
        from longtrain.hf import export_hf

        path = self.config.train.export_dir or os.path.join(self.config.train.output_dir, "hf")
        host_params = jax.device_get(params)
        if jax.process_index() == 0:
            export_hf(self.config.model, host_params, path)
        return os.path.abspath(path)


def build_mesh_and_runtime(config: Config):
    """-> (mesh, runtime). One device: runtime None (the models' LocalRuntime). More: a ParallelRuntime."""
    from longtrain import parallel

    resolve_mesh_shape(config.mesh, jax.device_count())  # ConfigError naming the axes when it does not fit
    mesh = parallel.mesh_from_config(config.mesh)
    if mesh.size == 1:
        return mesh, None
    # balance mode: the state is ZeRO-3 over the whole pool (eval runs on this runtime)
    param_axes = parallel.sharding.POOL_AXES if config.data.balance.enabled else parallel.PARAM_RULES["embed"]
    return mesh, parallel.ParallelRuntime.from_config(mesh, config.mesh, config.model, param_axes=param_axes)


def build_session(config: Config, *, with_data: bool = True) -> Session:
    from longtrain import models, parallel

    if config.data.balance.enabled:  # plans run on per-micro-batch meshes (train/balance_views.py)
        from longtrain.train.balance_views import check_balance_config

        check_balance_config(config)
    mesh, runtime = build_mesh_and_runtime(config)
    logical_axes = models.param_logical_axes(config.model)
    abstract_params = jax.eval_shape(lambda key: models.init(config.model, key), jax.random.PRNGKey(0))
    # balance mode: ZeRO-3 over the whole pool, so micro-batches of any context degree find their shards in place
    shard = parallel.pool_param_shardings if config.data.balance.enabled else parallel.param_shardings
    param_shardings = shard(abstract_params, logical_axes, mesh)
    session = Session(config=config, mesh=mesh, runtime=runtime, logical_axes=logical_axes,
                      param_shardings=param_shardings)
    context = mesh.shape["context"]
    if context > 1 and config.mesh.layout != "contiguous":
        session.layout_perm = parallel.layout.layout_permutation(config.mesh.layout, config.data.seq_len, context)
    if with_data:
        attach_data(session)
    return session


def check_tokenizer(config: Config) -> None:
    """Before anything compiles: the tokenizer loads, and every id it can produce (special tokens included) is a
    row of the model's embedding. A larger tokenizer would index past the table: NaN or garbage on every step."""
    from longtrain.data.tokenizers import make_tokenizer

    d = config.data
    try:
        tokenizer = make_tokenizer(d.tokenizer, bos_token=d.bos_token, eos_token=d.eos_token)
    except (ValueError, OSError) as e:
        raise ConfigError(str(e).splitlines()[0] if str(e) else f"data.tokenizer={d.tokenizer!r}: {e!r}") from None
    vocab = config.model.vocab_size
    if tokenizer.vocab_size > vocab:
        raise ConfigError(f"data.tokenizer={d.tokenizer!r} has {tokenizer.vocab_size} tokens but "
                          f"model.vocab_size={vocab}: set model.vocab_size >= {tokenizer.vocab_size} or use a "
                          "smaller tokenizer")
    for name, token_id in (("BOS", tokenizer.bos_id), ("EOS", tokenizer.eos_id)):
        if token_id is not None and not 0 <= token_id < vocab:
            raise ConfigError(f"data.tokenizer={d.tokenizer!r}: its {name} id {token_id} is outside "
                              f"model.vocab_size={vocab}")


def _probe(make_dataset) -> None:
    """Build a throwaway iterator and read one batch from it (raises DataError / ConfigError like training would)."""
    dataset = make_dataset()
    try:
        next(dataset)
    finally:
        if hasattr(dataset, "close"):
            dataset.close()


def attach_data(session: Session) -> None:
    """Build the training and eval iterators and the synthetic scorer (missing files fail here).

    Every process reads the whole global batch (`process_count=1`) and `put_batch` keeps its devices' blocks:
    the batches, and so the losses, do not depend on how many processes share the devices. In balance mode a
    process gets only its ranks' rows of each micro-batch (the plan is global), and
    `balance_views.ContextGroupViews` places them."""
    from longtrain import data

    config = session.config
    check_tokenizer(config)
    # balance mode: every process plans the whole step but reads only the documents on its own ranks
    share = (jax.process_index(), jax.process_count()) if config.data.balance.enabled else (0, 1)
    try:
        session.dataset = data.make_dataset(config, process_index=share[0], process_count=share[1])
    except FileNotFoundError as e:  # a missing/unmatched data path is a config problem: exit 2, one line
        raise ConfigError(str(e)) from None
    if config.train.eval_every:
        session.eval_dataset_factory = lambda: data.make_eval_dataset(config, process_index=0, process_count=1)
    if config.data.source != "synthetic":  # read a first batch now, not after compiling: no usable record,
        _probe(lambda: data.make_dataset(config, process_index=share[0], process_count=share[1]))  # strict, ...
        if config.train.eval_every and config.data.eval_paths:
            _probe(session.eval_dataset_factory)
    if config.data.source == "synthetic":
        session.score_fn = data.score_answers
