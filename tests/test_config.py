"""Config system: YAML load, typed overrides, errors that name the key, cross-field rules, YAML round trip."""
import dataclasses
import os
import subprocess
import sys

import pytest
import yaml

from longtrain.config import (
    Config,
    ConfigError,
    all_keys,
    from_dict,
    load_config,
    resolve_mesh_shape,
    to_dict,
    to_yaml,
)


def write(tmp_path, tree, name="c.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(tree))
    return str(path)


def test_yaml_load_sets_nested_values_and_keeps_defaults(tmp_path):
    path = write(tmp_path, {"model": {"hidden_size": 96, "rope_scaling": {"type": "yarn", "factor": 4}},
                            "optim": {"learning_rate": "1e-3"}})
    config = load_config(path)
    assert config.model.hidden_size == 96
    assert config.model.rope_scaling.type == "yarn"
    assert config.model.rope_scaling.factor == 4.0 and isinstance(config.model.rope_scaling.factor, float)
    assert config.optim.learning_rate == pytest.approx(1e-3)  # YAML 1.1 reads 1e-3 as a string
    assert config.model.num_layers == Config().model.num_layers


@pytest.mark.parametrize(
    "override, getter, expected",
    [
        ("model.num_layers=7", lambda c: c.model.num_layers, 7),  # int
        ("optim.learning_rate=2.5e-4", lambda c: c.optim.learning_rate, 2.5e-4),  # float, exponent form
        ("optim.learning_rate=1", lambda c: c.optim.learning_rate, 1.0),  # int given for a float
        ("model.tie_embeddings=true", lambda c: c.model.tie_embeddings, True),  # bool
        ("model.tie_embeddings=False", lambda c: c.model.tie_embeddings, False),
        ("data.text_field=content", lambda c: c.data.text_field, "content"),  # str
        ("data.tokenizer=123", lambda c: c.data.tokenizer, "123"),  # number given for a str
        ("model.sliding_window=null", lambda c: c.model.sliding_window, None),  # null for an optional
        ("model.sliding_window=128", lambda c: c.model.sliding_window, 128),
        ("train.profile_steps=[3,5]", lambda c: c.train.profile_steps, [3, 5]),  # list
        ("data.paths=[a.jsonl, 'b*.jsonl']", lambda c: c.data.paths, ["a.jsonl", "b*.jsonl"]),
        ("model.rope_scaling.type=llama3", lambda c: c.model.rope_scaling.type, "llama3"),  # nested 3 deep
        ("data.balance.enabled=yes", lambda c: c.data.balance.enabled, True),
        ("mesh.layout=striped", lambda c: c.mesh.layout, "striped"),  # choice
    ],
)
def test_override_of_every_scalar_type(override, getter, expected):
    config = load_config(None, [override])
    value = getter(config)
    assert value == expected and type(value) is type(expected)


def test_override_wins_over_file_and_later_override_wins(tmp_path):
    path = write(tmp_path, {"optim": {"learning_rate": 0.5}})
    config = load_config(path, ["optim.learning_rate=0.25", "optim.learning_rate=0.125"])
    assert config.optim.learning_rate == 0.125


@pytest.mark.parametrize(
    "overrides, must_contain",
    [
        (["optim.lr=1"], ["optim.lr", "optim.learning_rate"]),
        (["model.hiden_size=3"], ["model.hiden_size", "model.hidden_size"]),
        (["modle.hidden_size=3"], ["modle", "model"]),
        (["model.num_layers.x=3"], ["model.num_layers", "not a section"]),
    ],
)
def test_unknown_key_names_key_and_closest(overrides, must_contain):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    for text in must_contain:
        assert text in str(e.value)


def test_unknown_key_in_file_names_file(tmp_path):
    path = write(tmp_path, {"optim": {"warmup": 3}})
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert "optim.warmup" in str(e.value) and path in str(e.value) and "optim.warmup_steps" in str(e.value)


@pytest.mark.parametrize(
    "override, must_contain",
    [
        ("model.num_layers=two", ["model.num_layers", "'two'", "an integer"]),
        ("model.num_layers=2.5", ["model.num_layers", "2.5", "an integer"]),
        ("model.tie_embeddings=maybe", ["model.tie_embeddings", "maybe", "boolean"]),
        ("train.profile_steps=3", ["train.profile_steps", "list"]),
        ("mesh.layout=diagonal", ["mesh.layout", "diagonal", "zigzag"]),
        ("model.num_layers=null", ["model.num_layers", "None"]),
        ("model.num_heads=0", ["model.num_heads", "0", ">= 1"]),
        ("optim.min_lr_ratio=1.5", ["optim.min_lr_ratio", "1.5", "<= 1"]),
        ("optim.spaco_keep_prob=0", ["optim.spaco_keep_prob", "> 0"]),
        ("optim.learning_rate=nan", ["optim.learning_rate", "finite"]),
    ],
)
def test_bad_value_names_key_value_and_allowed(override, must_contain):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    for text in must_contain:
        assert text in str(e.value), str(e.value)


@pytest.mark.parametrize(
    "overrides, num_devices, must_contain",
    [
        (["model.num_heads=6", "model.num_kv_heads=4"], None, ["num_heads=6", "num_kv_heads=4", "divisible"]),
        (["mesh.data=3", "mesh.context=2"], 8, ["mesh product must equal the device count", "6", "8 devices"]),
        (["mesh.data=-1", "mesh.context=-1"], 8, ["only one mesh axis may be -1"]),
        (["mesh.data=-1", "mesh.context=3"], 8, ["cannot fill 8 devices"]),
        (["mesh.data=2", "mesh.context=4", "data.seq_len=250"], 8, ["data.seq_len=250", "mesh.context=4"]),
        (["mesh.data=8", "data.batch_size=4"], 8, ["data.batch_size=4", "divisible"]),
        (["model.num_layers=2", "model.architecture=minimax", "model.layer_types=[linear_attention]"], None,
         ["layer_types has 1 entries", "num_layers=2"]),
        (["model.layer_types=[linear_attention, full_attention]"], None, ["only model.architecture='minimax'"]),
        (["model.num_experts=2", "model.experts_per_token=3"], None, ["experts_per_token=3"]),
        (["data.source=jsonl"], None, ["data.paths"]),
        (["optim.warmup_steps=50", "train.steps=10"], None, ["warmup_steps=50", "train.steps=10"]),
    ],
)
def test_cross_field_rules(overrides, num_devices, must_contain):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides, num_devices=num_devices)
    for text in must_contain:
        assert text in str(e.value), str(e.value)


def test_mesh_fill_resolves_to_device_count():
    config = load_config(None, ["mesh.data=-1", "mesh.context=4"], num_devices=8)
    assert resolve_mesh_shape(config.mesh, 8) == {"data": 2, "fsdp": 1, "context": 4, "tensor": 1}


def _random_config(rng) -> Config:
    """A config with every section perturbed away from its defaults."""
    tree = {
        "model": {"hidden_size": int(rng.integers(8, 512)) * 4, "num_heads": 4, "num_kv_heads": 2,
                  "rope_scaling": {"type": "yarn", "factor": float(rng.uniform(1, 8)), "attention_factor": None},
                  "sliding_window": int(rng.integers(1, 999)), "tie_embeddings": bool(rng.integers(2))},
        "mesh": {"data": 2, "context": 4, "layout": "striped"},
        "data": {"source": "jsonl", "paths": ["a.jsonl", "b/*.jsonl"], "weights": [0.25, 0.75]},
        "optim": {"learning_rate": float(rng.uniform(1e-5, 1e-2)), "grad_clip": None},
        "train": {"steps": int(rng.integers(10, 1000)), "profile_steps": [2, 4]},
        "checkpoint": {"keep": 5},
        "logging": {"wandb_mode": "offline"},
    }
    return from_dict(tree)


def test_round_trip_yaml_equals(tmp_path):
    import numpy as np

    config = _random_config(np.random.default_rng(0))
    assert config != Config()
    path = tmp_path / "resolved.yaml"
    path.write_text(to_yaml(config))
    assert load_config(str(path)) == config
    assert to_dict(load_config(str(path))) == to_dict(config)


def test_every_key_is_overridable():
    """Each leaf of the tree can be set by its dotted name (to its own default)."""
    defaults = to_dict(Config())
    for key in all_keys():
        node = defaults
        for part in key.split("."):
            node = node[part]
        if isinstance(node, dict):
            continue
        text = yaml.safe_dump(node, default_flow_style=True).strip().removesuffix("...").strip()
        load_config(None, [f"{key}={text}"])


def test_shipped_configs_load(repo_root):
    configs = os.path.join(repo_root, "configs")
    names = [n for n in os.listdir(configs) if n.endswith(".yaml")]
    assert "tiny_cpu.yaml" in names
    for name in names:
        config = load_config(os.path.join(configs, name))
        assert dataclasses.is_dataclass(config)
