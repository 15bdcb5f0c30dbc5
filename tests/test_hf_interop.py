"""HF interop against `transformers` (the oracle): import -> our logits == HF logits; export -> HF loads it and its
logits match; generate runs; import -> export -> import is bitwise; bad folders fail naming file and tensor.

Tiny random models are built from configs in the test (no downloads), fp32, with weights perturbed away from their
init so biases and norm weights are not trivially zero/one.
"""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from longtrain import models  # noqa: E402
from longtrain.hf import (CheckpointFormatError, UnsupportedConfigError, export_hf, get_converter,  # noqa: E402
                          import_hf)

VOCAB, T = 97, 24  # T > the mistral window (8) and > original_max_position_embeddings of the scaled ropes (16)

CASES = {
    "llama_untied_llama3": dict(model_type="llama", tie_word_embeddings=False, rope_parameters={
        "rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 16}),
    "llama_tied_yarn_bias": dict(model_type="llama", tie_word_embeddings=True, attention_bias=True, mlp_bias=True,
                                 max_position_embeddings=64, rope_parameters={
                                     "rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                     "original_max_position_embeddings": 16}),
    "llama_dynamic": dict(model_type="llama", max_position_embeddings=16, rope_parameters={
        "rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}),
    "llama_linear": dict(model_type="llama", rope_parameters={"rope_type": "linear", "rope_theta": 500.0,
                                                              "factor": 2.0}),
    "mistral_window": dict(model_type="mistral", sliding_window=8),
    "qwen2": dict(model_type="qwen2", tie_word_embeddings=True),
    "qwen3": dict(model_type="qwen3", head_dim=16),
}


def make_hf_model(case: str, folder: str, seed: int = 0):
    kw = dict(CASES[case])
    model_type = kw.pop("model_type")
    cfg = transformers.AutoConfig.for_model(model_type, vocab_size=VOCAB, hidden_size=32, intermediate_size=48,
                                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                            **kw)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(folder)
    return model


def hf_logits(model, tokens):
    with torch.no_grad():
        return model(torch.tensor(np.asarray(tokens))).logits.numpy()


def assert_logits_close(ours, ref):
    ours, ref = np.asarray(ours), np.asarray(ref)
    assert ours.shape == ref.shape
    err = np.abs(ours - ref).max()
    assert err <= 1e-4 * max(1.0, np.abs(ref).max()), f"max abs diff {err} (max |ref| {np.abs(ref).max()})"


def random_tokens(seed=0, batch=2, length=T):
    return np.random.RandomState(seed).randint(0, VOCAB, (batch, length)).astype(np.int32)


@pytest.mark.parametrize("case", list(CASES))
def test_import_matches_transformers_and_export_round_trips(case, tmp_path):
    src, out = str(tmp_path / "hf"), str(tmp_path / "exported")
    hf_model = make_hf_model(case, src)
    tokens = random_tokens()
    ref = hf_logits(hf_model, tokens)

    config, params = import_hf(src)
    assert config.architecture == CASES[case]["model_type"]
    assert_logits_close(models.forward(config, params, jnp.asarray(tokens)), ref)

    export_hf(config, params, out, source_dir=src)
    with open(os.path.join(out, "config.json")) as fh:
        written = json.load(fh)
    assert written["model_type"] == config.architecture
    assert written["architectures"] == [get_converter(config.architecture).architecture_class]
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert_logits_close(hf_logits(reloaded, tokens), ref)

    config2, params2 = import_hf(out)
    assert config2 == config
    flat1, tree1 = jax.tree_util.tree_flatten(params)
    flat2, tree2 = jax.tree_util.tree_flatten(params2)
    assert tree1 == tree2
    for a, b in zip(flat1, flat2):
        assert a.dtype == b.dtype and np.array_equal(a.view(np.uint8), b.view(np.uint8))


def test_exported_model_generates_and_bf16_sharded_export_loads(tmp_path):
    src, out = str(tmp_path / "hf"), str(tmp_path / "exported")
    make_hf_model("llama_untied_llama3", src)
    config, params = import_hf(src)
    # tiny shard limit: several shards + index; bf16 storage
    files = export_hf(config, params, out, dtype="bf16", max_shard_bytes=8_000)
    assert "model.safetensors.index.json" in files and len([f for f in files if f.startswith("model-")]) > 2
    with open(os.path.join(out, "model.safetensors.index.json")) as fh:
        index = json.load(fh)
    assert set(index["weight_map"]) == {s.hf_name for s in get_converter("llama").tensor_specs(config)}
    model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert model.dtype == torch.bfloat16
    prompt = torch.tensor(random_tokens(1, batch=1, length=5))
    generated = model.generate(prompt, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert generated.shape == (1, 9)
    # bf16 storage = our fp32 params rounded to bf16
    config_bf16, params_bf16 = import_hf(out)
    want = np.asarray(params["layers"]["mlp"]["up_proj"]["kernel"]).astype(jnp.bfloat16).astype(np.float32)
    np.testing.assert_array_equal(params_bf16["layers"]["mlp"]["up_proj"]["kernel"], want)


def test_export_over_an_earlier_sharded_export_leaves_none_of_its_files(tmp_path):
    """Exporting into a folder that holds an earlier sharded export: only the new files remain, and both
    transformers and import_hf read the NEW weights."""
    src, out = str(tmp_path / "hf"), str(tmp_path / "exported")
    make_hf_model("llama_untied_llama3", src)
    config, params = import_hf(src)
    export_hf(config, params, out, dtype="bf16", max_shard_bytes=8_000)
    newer = jax.tree.map(lambda x: x * 1.5 + 0.01, params)
    files = export_hf(config, newer, out)
    assert sorted(os.listdir(out)) == sorted(files) and "model.safetensors" in files
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".exported.")]  # no temporary folders left
    _, got = import_hf(out)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(newer)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    kernel = np.asarray(newer["layers"]["mlp"]["up_proj"]["kernel"][0]).T
    np.testing.assert_array_equal(model.model.layers[0].mlp.up_proj.weight.detach().numpy(), kernel)


def test_export_refuses_a_folder_with_foreign_files(tmp_path):
    src, out = str(tmp_path / "hf"), tmp_path / "exported"
    make_hf_model("llama_untied_llama3", src)
    config, params = import_hf(src)
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="notes.txt"):
        export_hf(config, params, str(out))
    assert os.listdir(out) == ["notes.txt"]


def test_import_refuses_an_index_that_does_not_match_its_files(tmp_path):
    src, out = str(tmp_path / "hf"), str(tmp_path / "exported")
    make_hf_model("llama_untied_llama3", src)
    config, params = import_hf(src)
    export_hf(config, params, out, max_shard_bytes=8_000)
    index_path = os.path.join(out, "model.safetensors.index.json")
    index = json.load(open(index_path))
    first = sorted(set(index["weight_map"].values()))[0]
    moved = next(t for t, f in index["weight_map"].items() if f == first)
    index["weight_map"][moved] = sorted(set(index["weight_map"].values()))[1]  # the index says another shard
    json.dump(index, open(index_path, "w"))
    with pytest.raises(CheckpointFormatError, match=f"does not match .*{moved}"):
        import_hf(out)
    # a single-file export beside a stale index (what an export without the swap used to leave behind)
    import shutil

    shutil.copyfile(os.path.join(src, "model.safetensors"), os.path.join(out, "model.safetensors"))
    with pytest.raises(CheckpointFormatError, match="both model.safetensors and model.safetensors.index.json"):
        import_hf(out)


# ------------------------------------------------------------------------------------------------ bad input
@pytest.fixture
def llama_dir(tmp_path):
    folder = str(tmp_path / "hf")
    make_hf_model("llama_untied_llama3", folder)
    return folder


def _edit_config(folder, **changes):
    path = os.path.join(folder, "config.json")
    with open(path) as fh:
        cfg = json.load(fh)
    cfg.update(changes)
    with open(path, "w") as fh:
        json.dump(cfg, fh)
    return path


def _rewrite_weights(folder, edit):
    from safetensors.numpy import load_file, save_file

    path = os.path.join(folder, "model.safetensors")
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})
    return path


def test_unknown_model_type_names_file_and_type(llama_dir):
    path = _edit_config(llama_dir, model_type="gpt_neox")
    with pytest.raises(UnsupportedConfigError, match=r"config\.json.*gpt_neox"):
        import_hf(llama_dir)
    assert path.endswith("config.json")


def test_unsupported_config_field_is_not_dropped(llama_dir):
    _edit_config(llama_dir, hidden_act="gelu")
    with pytest.raises(UnsupportedConfigError, match="hidden_act='gelu'"):
        import_hf(llama_dir)
    _edit_config(llama_dir, hidden_act="silu", logit_softcapping=30.0)
    with pytest.raises(UnsupportedConfigError, match="logit_softcapping"):
        import_hf(llama_dir)


def test_unsupported_rope_type_is_named(llama_dir):
    _edit_config(llama_dir, rope_parameters={"rope_type": "longrope", "rope_theta": 1e4, "factor": 2.0})
    with pytest.raises(UnsupportedConfigError, match="longrope"):
        import_hf(llama_dir)


def test_missing_tensor_names_file_and_tensor(llama_dir):
    name = "model.layers.1.mlp.up_proj.weight"
    path = _rewrite_weights(llama_dir, lambda t: t.pop(name))
    with pytest.raises(CheckpointFormatError) as info:
        import_hf(llama_dir)
    assert path in str(info.value) and name in str(info.value) and "missing" in str(info.value)


def test_shape_mismatch_names_file_and_tensor(llama_dir):
    name = "model.layers.0.self_attn.k_proj.weight"

    def shrink(t):
        t[name] = t[name][:-1]

    path = _rewrite_weights(llama_dir, shrink)
    with pytest.raises(CheckpointFormatError) as info:
        import_hf(llama_dir)
    msg = str(info.value)
    assert path in msg and name in msg and "[15, 32]" in msg and "[16, 32]" in msg


def test_unexpected_tensor_is_reported(llama_dir):
    def add(t):
        t["model.layers.0.self_attn.extra.weight"] = np.ones((2, 2), np.float32)

    _rewrite_weights(llama_dir, add)
    with pytest.raises(CheckpointFormatError, match="extra.weight"):
        import_hf(llama_dir)


def test_export_refuses_fields_hf_cannot_express():
    from longtrain.config import ModelConfig

    config = ModelConfig(architecture="llama", sliding_window=8)
    with pytest.raises(UnsupportedConfigError, match="sliding_window=8"):
        export_hf(config, None, "/nonexistent/never-written")  # refused before any tensor is touched


def test_transformers_v4_style_llama31_config_is_read():
    """config.json as older transformers wrote Llama 3.1 (rope_scaling + rope_theta at top level, eos list)."""
    hf = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "attention_bias": False,
          "attention_dropout": 0.0, "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009],
          "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 14336,
          "max_position_embeddings": 131072, "mlp_bias": False, "num_attention_heads": 32, "num_hidden_layers": 32,
          "num_key_value_heads": 8, "pretraining_tp": 1, "rms_norm_eps": 1e-05,
          "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                           "original_max_position_embeddings": 8192, "rope_type": "llama3"},
          "rope_theta": 500000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
          "transformers_version": "4.43.0.dev0", "use_cache": True, "vocab_size": 128256}
    config = get_converter("llama").config_from_hf(hf)
    assert config.rope_theta == 500000.0 and config.rope_scaling.type == "llama3"
    assert config.rope_scaling.original_max_position_embeddings == 8192 and config.rope_scaling.factor == 8.0
    assert config.eos_token_id == [128001, 128008, 128009] and config.num_kv_heads == 8
    assert config.resolved_head_dim == 128 and not config.tie_embeddings
    back = get_converter("llama").config_to_hf(config)
    assert back["rope_parameters"] == {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                       "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                       "original_max_position_embeddings": 8192}
    assert back["eos_token_id"] == [128001, 128008, 128009]
