"""MiniMax Hugging Face interop through `longtrain.hf.import_hf` / `export_hf`: logits equal transformers',
export loads with `from_pretrained` (and generates), import -> export -> import is bitwise, bad configs and
checkpoints fail with messages naming the key / file / tensor. Tiny random models, fp32, no downloads."""
import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
from transformers import AutoModelForCausalLM  # noqa: E402

from longtrain import models  # noqa: E402
from longtrain.hf import CheckpointFormatError, UnsupportedConfigError, convert, export_hf, import_hf  # noqa: E402
from longtrain.hf.minimax import MINIMAX  # noqa: E402

from test_minimax import assert_close, hf_logits, random_hf_model  # noqa: E402

# The generic driver must check/write the config-derived decay buffers and accept (layer, expert) indices.
DRIVER_READY = any("derived_tensors" in name for name in convert.import_hf.__code__.co_names)
needs_driver = pytest.mark.skipif(not DRIVER_READY, reason="longtrain/hf/convert.py does not call "
                                  "converter.derived_tensors / accept (layer, expert) spec indices yet")


@needs_driver
def test_import_export_roundtrip_matches_transformers(tmp_path):
    src, dst, again = (str(tmp_path / n) for n in ("hf", "exported", "again"))
    model = random_hf_model(src, seed=3)
    tokens = np.random.RandomState(4).randint(0, 97, (2, 40))  # 40 tokens > lightning block of 16
    ref = hf_logits(model, tokens)

    config, params = import_hf(src)
    assert config.layer_types.count("linear_attention") == 2 and config.num_experts == 3
    forward = jax.jit(lambda p, t: models.forward(config, p, t))
    assert_close(forward(params, jnp.asarray(tokens)), ref)

    export_hf(config, params, dst)
    with open(os.path.join(dst, "config.json")) as fh:
        written = json.load(fh)
    assert written["model_type"] == "minimax" and written["architectures"] == ["MiniMaxForCausalLM"]
    reloaded = AutoModelForCausalLM.from_pretrained(dst).eval()
    assert_close(hf_logits(reloaded, tokens), ref)
    # the exported folder has every key transformers expects (decay buffers included): nothing re-initialised
    assert set(reloaded.state_dict()) == set(model.state_dict())
    generated = reloaded.generate(torch.tensor(tokens[:1, :8]), max_new_tokens=5, do_sample=False)
    assert generated.shape == (1, 13)

    config2, params2 = import_hf(dst)
    assert dataclasses.asdict(config2) == dataclasses.asdict(config)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params2)):
        assert a.dtype == b.dtype and np.array_equal(np.asarray(a), np.asarray(b))
    # the decay buffers are not parameters: export recomputes them from config.json with numpy, whose float32 exp
    # may differ from torch's by one ulp (the README says so); every parameter round-trips bitwise (above)
    from safetensors.numpy import load_file

    theirs, ours = load_file(os.path.join(src, "model.safetensors")), load_file(os.path.join(dst, "model.safetensors"))
    buffers = [k for k in theirs if k.endswith(("_decay", "slope_rate"))]
    assert buffers and set(buffers) <= set(ours)
    for k in buffers:
        np.testing.assert_array_max_ulp(ours[k], theirs[k], maxulp=1)
    export_hf(config2, params2, again)  # and once more: the re-exported tensors are byte-identical
    with open(os.path.join(dst, "model.safetensors"), "rb") as f1, open(os.path.join(again, "model.safetensors"),
                                                                        "rb") as f2:
        assert f1.read() == f2.read()


@needs_driver
def test_wrong_decay_buffer_is_rejected(tmp_path):
    folder = str(tmp_path / "hf")
    random_hf_model(folder, seed=5, num_hidden_layers=2, layer_types=["linear_attention", "full_attention"])
    from safetensors.numpy import load_file, save_file
    path = os.path.join(folder, "model.safetensors")
    tensors = load_file(path)
    tensors["model.layers.0.self_attn.slope_rate"] = tensors["model.layers.0.self_attn.slope_rate"] * 2
    save_file(tensors, path)
    with pytest.raises(CheckpointFormatError, match=r"model\.safetensors.*model\.layers\.0\.self_attn\.slope_rate"):
        import_hf(folder)


def _hf_config_dict(tmp_path):
    folder = str(tmp_path / "cfg")
    random_hf_model(folder, seed=6, num_hidden_layers=2, layer_types=["linear_attention", "full_attention"])
    with open(os.path.join(folder, "config.json")) as fh:
        return json.load(fh)


def test_config_roundtrip_and_unsupported_fields(tmp_path):
    hf = _hf_config_dict(tmp_path)
    config = MINIMAX.config_from_hf(hf)
    assert (config.full_attn_alpha_factor, config.linear_attn_beta_factor) == (0.7, 1.3)
    assert config.lightning_block_size == 16 and config.experts_per_token == 2
    assert MINIMAX.config_from_hf(MINIMAX.config_to_hf(config)) == config
    with pytest.raises(UnsupportedConfigError, match="router_jitter_noise"):
        MINIMAX.config_from_hf({**hf, "router_jitter_noise": 0.1})
    with pytest.raises(UnsupportedConfigError, match="postnorm"):
        MINIMAX.config_from_hf({**hf, "postnorm": True})
    with pytest.raises(UnsupportedConfigError, match="partial_rotary_factor"):
        MINIMAX.config_from_hf({**hf, "rope_parameters": {"rope_type": "default", "rope_theta": 1e6,
                                                          "partial_rotary_factor": 0.5}})
    with pytest.raises(UnsupportedConfigError, match="lightning_norm_eps"):
        MINIMAX.config_to_hf(dataclasses.replace(config, lightning_norm_eps=1e-5))


def test_tensor_specs_are_exact_inverses_and_cover_params():
    """Every params leaf (every (layer[, expert]) slice) is written exactly once, and to_hf(to_params(x)) == x."""
    config = MINIMAX.config_from_hf(MINIMAX.config_to_hf(models_config()))
    shapes = jax.eval_shape(lambda: models.init(config, jax.random.key(0)))
    written = {}
    rs = np.random.RandomState(0)
    for spec in MINIMAX.tensor_specs(config):
        hf = rs.randn(*spec.hf_shape).astype(np.float32)
        assert np.array_equal(spec.to_hf(spec.to_params(hf)), hf), spec.hf_name
        leaf = shapes
        for key in spec.path:
            leaf = leaf[key]
        target = leaf.shape if spec.layer is None else np.empty(leaf.shape)[spec.layer].shape
        assert spec.to_params(hf).shape == target, spec.hf_name
        index = spec.layer if isinstance(spec.layer, tuple) else (spec.layer,)
        assert (spec.path, index) not in written
        written[(spec.path, index)] = True
    counts = {}
    for path, _ in written:
        counts[path] = counts.get(path, 0) + 1
    flat = jax.tree_util.tree_flatten_with_path(shapes)[0]
    for key_path, leaf in flat:
        path = tuple(k.key for k in key_path)
        if path[0] != "layers":
            assert counts[path] == 1
        elif path[-2:] in (("experts", "gate"), ("experts", "up"), ("experts", "down")):
            assert counts[path] == leaf.shape[0] * leaf.shape[1]
        else:
            assert counts[path] == leaf.shape[0]


def models_config():
    from test_minimax import small_config
    return small_config()
