"""`train.init_from`: weights from a `longtrain import` folder or a Hugging Face folder, placed with the
parameter shardings; a different model is refused naming each differing field."""
import dataclasses
import os

import jax
import numpy as np
import pytest

from longtrain import models, parallel
from longtrain.config import Config, ConfigError, ModelConfig, to_yaml
from longtrain.train.init_from import check_init_from, load_params

MODEL = ModelConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2)


def _abstract(mesh):
    shapes = jax.eval_shape(lambda k: models.init(MODEL, k), jax.random.PRNGKey(0))
    shardings = parallel.param_shardings(shapes, models.param_logical_axes(MODEL), mesh)
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), shapes, shardings)


@pytest.mark.parametrize("kind", ["longtrain_import", "hugging_face"])
def test_init_from_round_trips_onto_the_mesh(kind, tmp_path):
    rng = np.random.default_rng(7)  # random weights of the model's shapes (models.init compiles slowly on CPU)
    shapes = jax.eval_shape(lambda k: models.init(MODEL, k), jax.random.PRNGKey(0))
    params = jax.tree.map(lambda a: jax.numpy.asarray(rng.normal(size=a.shape), a.dtype), shapes)
    path = str(tmp_path / kind)
    if kind == "hugging_face":
        from longtrain.hf import export_hf

        export_hf(MODEL, jax.device_get(params), path)
    else:
        import orbax.checkpoint as ocp

        os.makedirs(path)
        ckpt = ocp.StandardCheckpointer()
        ckpt.save(os.path.join(path, "params"), params)
        ckpt.wait_until_finished()
        with open(os.path.join(path, "config.yaml"), "w") as f:
            f.write(to_yaml(Config(model=MODEL)))
    mesh = parallel.make_mesh(data=1, fsdp=2, context=4)
    abstract = _abstract(mesh)
    loaded = load_params(path, MODEL, abstract)
    jax.tree.map(lambda got, want, a: (np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6),
                                       got.sharding == a.sharding or pytest.fail(f"{got.sharding} != {a.sharding}")),
                 loaded, params, abstract)
    other = dataclasses.replace(MODEL, num_layers=3, hidden_size=48)
    with pytest.raises(ConfigError, match=r"model\.hidden_size.*model\.num_layers"):
        load_params(path, other, abstract)


def test_init_from_missing_or_unknown_folder(tmp_path):
    with pytest.raises(ConfigError, match="train.init_from=.*does not exist"):
        check_init_from(str(tmp_path / "nope"))
    with pytest.raises(ConfigError, match="neither params/"):
        check_init_from(str(tmp_path))


def test_fine_tune_inherits_special_token_ids_so_its_export_carries_them(tmp_path):
    """A fine-tune's config often leaves the token ids unset: they come from the init_from model (else the HF
    export would say bos/eos null and generation would not know when to stop)."""
    import json

    from longtrain.hf import export_hf
    from longtrain.train.init_from import inherit_token_ids

    rng = np.random.default_rng(3)
    shapes = jax.eval_shape(lambda k: models.init(MODEL, k), jax.random.PRNGKey(0))
    params = jax.tree.map(lambda a: np.asarray(rng.normal(size=a.shape), a.dtype), shapes)
    base = dataclasses.replace(MODEL, bos_token_id=1, eos_token_id=[2, 3], pad_token_id=0)
    export_hf(base, params, str(tmp_path / "base"))
    config = Config(model=dataclasses.replace(MODEL, eos_token_id=[5]))
    config.train.init_from = str(tmp_path / "base")
    assert inherit_token_ids(config) == ["model.bos_token_id=1", "model.pad_token_id=0"]
    assert (config.model.bos_token_id, config.model.eos_token_id, config.model.pad_token_id) == (1, [5], 0)
    export_hf(config.model, params, str(tmp_path / "tuned"))
    hf = json.load(open(tmp_path / "tuned" / "config.json"))
    generation = json.load(open(tmp_path / "tuned" / "generation_config.json"))
    assert (hf["bos_token_id"], hf["eos_token_id"], hf["pad_token_id"]) == (1, 5, 0)
    assert generation["bos_token_id"] == 1 and generation["eos_token_id"] == 5
    config.train.init_from = None
    assert inherit_token_ids(config) == []
