"""`longtrain import` / `longtrain export` in subprocesses: HF folder -> orbax checkpoint -> HF folder (bf16), which
`transformers` loads with the same weights (rounded to bf16) and the tokenizer / generation files carried along."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def _cli(*argv):
    return subprocess.run([sys.executable, "-m", "longtrain", *argv], capture_output=True, text=True, timeout=300)


def test_cli_import_export_round_trip(tmp_path):
    src, ckpt, out = str(tmp_path / "hf"), str(tmp_path / "ckpt"), str(tmp_path / "exported")
    cfg = transformers.AutoConfig.for_model("qwen2", vocab_size=53, hidden_size=32, intermediate_size=40,
                                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                            bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(src)
    with open(os.path.join(src, "tokenizer_config.json"), "w") as fh:
        json.dump({"model_max_length": 4096, "marker": "carried"}, fh)

    r = _cli("import", src, ckpt)
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(ckpt)) == ["config.yaml", "hf_assets", "params"]
    from longtrain.config import load_config

    assert load_config(os.path.join(ckpt, "config.yaml")).model.architecture == "qwen2"

    r = _cli("export", ckpt, out, "--dtype", "bf16")
    assert r.returncode == 0, r.stderr
    with open(os.path.join(out, "tokenizer_config.json")) as fh:
        assert json.load(fh)["marker"] == "carried"
    with open(os.path.join(out, "config.json")) as fh:
        exported_cfg = json.load(fh)
    assert exported_cfg["model_type"] == "qwen2" and exported_cfg["dtype"] == "bfloat16"
    assert exported_cfg["eos_token_id"] == 2 and exported_cfg["bos_token_id"] == 1

    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out)
    original = dict(model.state_dict())
    for name, tensor in reloaded.state_dict().items():
        assert tensor.dtype == torch.bfloat16
        np.testing.assert_array_equal(tensor.float().numpy(), original[name].to(torch.bfloat16).float().numpy(),
                                      err_msg=name)


def test_cli_errors_exit_2_with_the_reason(tmp_path):
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "bloom"}))
    r = _cli("import", str(folder), str(tmp_path / "out"))
    assert r.returncode == 2 and "bloom" in r.stderr and "config.json" in r.stderr


def test_export_reads_params_of_a_trainer_checkpoint(tmp_path):
    """A trainer checkpoint (state + config items, as `longtrain.train.checkpoint.Checkpointer` writes them):
    `longtrain export` restores only state["params"] of the latest step."""
    import jax
    import jax.numpy as jnp

    from longtrain import models
    from longtrain.cli import main
    from longtrain.config import Config, ModelConfig, to_dict
    from longtrain.hf import import_hf
    from longtrain.train.checkpoint import Checkpointer

    config = Config(model=ModelConfig(architecture="qwen3", qk_norm=True, vocab_size=40, hidden_size=16,
                                      intermediate_size=24, num_heads=2, num_kv_heads=1))
    rng = np.random.RandomState(3)  # random values in the init layout (compiling the threefry init is slow)
    params = jax.tree.map(lambda s: jnp.asarray(rng.standard_normal(s.shape), s.dtype),
                          jax.eval_shape(lambda: models.init(config.model, jax.random.key(0))))
    state = {"params": params, "opt_state": {"mu": jax.tree.map(jnp.zeros_like, params)}, "step": jnp.int32(5)}
    ckpt = Checkpointer(str(tmp_path / "ckpt"), keep=2, async_save=False)
    ckpt.save(5, state, {"epoch": 0}, to_dict(config))
    ckpt.close()

    assert main(["export", str(tmp_path / "ckpt"), str(tmp_path / "hf")]) == 0
    model_config, exported = import_hf(str(tmp_path / "hf"))
    assert model_config.architecture == "qwen3" and model_config.hidden_size == 16
    for a, b in zip(jax.tree.leaves(exported), jax.tree.leaves(params)):
        np.testing.assert_array_equal(a, np.asarray(b))
