"""The README's "Use the models from Python" block runs as written, and does what its comments say."""
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def readme_python_block() -> str:
    text = open(README).read()
    section = text[text.index("### Use the models from Python"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_models_from_python_block(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    ns: dict = {}
    exec(compile(readme_python_block(), "README.md:Use the models from Python", "exec"), ns)  # noqa: S102
    tokens, logits, model = ns["tokens"], ns["logits"], ns["model"]
    config = ns["config"]
    assert logits.shape == (2, 16, config.vocab_size) and logits.dtype == jnp.float32
    # the logits are the hidden states times the LM head (computed here in numpy, fp64)
    oracle = np.asarray(ns["hidden"], np.float64) @ np.asarray(model.lm_head_weight(), np.float64)
    np.testing.assert_allclose(np.asarray(logits), oracle, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(ns["logits_jit"]), np.asarray(logits), rtol=1e-5, atol=1e-6)
    printed = capsys.readouterr().out
    assert "(2, 64, 4, 16)" in printed and "('layers', 'embed', 'heads', 'head_dim')" in printed
    # the HF folder round trip keeps every parameter bit for bit, so the imported model's logits are the same
    assert os.path.exists(tmp_path / "tiny_llama_hf" / "config.json")
    state_before = nnx.to_pure_dict(ns["state"])
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(state_before), jax.tree.leaves(ns["params"])):
        assert a.shape == b.shape, path
    # one optimizer step moved the backbone (the imported model, shared by the reward model) and lowered the loss
    reward, loss = ns["reward"], ns["loss"]
    assert float(ns["loss_fn"](reward)) < float(loss)
    moved = nnx.state(ns["model2"])["embed"]["embedding"][...]
    assert not np.allclose(np.asarray(moved), np.asarray(ns["params"]["embed"]["embedding"]))
