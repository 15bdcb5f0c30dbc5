"""MiniMax hybrid (lightning + softmax layers, MoE MLP) against the transformers implementation, plus packing and
chunk-wise (kv_prefix / return_kv) equivalences. Tiny random models built in the test, fp32, no downloads."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from transformers import MiniMaxConfig, MiniMaxForCausalLM  # noqa: E402
from transformers.models.minimax import modeling_minimax as hf_minimax  # noqa: E402

from longtrain import models  # noqa: E402
from longtrain.config import ModelConfig  # noqa: E402
from longtrain.hf.minimax import MINIMAX  # noqa: E402
from longtrain.hf.safetensors_io import SafetensorsReader  # noqa: E402
from longtrain.models import attention_site, minimax, moe  # noqa: E402
from longtrain.models.lightning_block import Lightning, lightning_slopes  # noqa: E402

E, H, D, I = 32, 4, 8, 24
MIXED = ["linear_attention", "full_attention", "linear_attention", "full_attention"]


def hf_config(**overrides):
    kw = dict(vocab_size=97, hidden_size=E, intermediate_size=I, num_hidden_layers=4, num_attention_heads=H,
              num_key_value_heads=2, head_dim=D, num_local_experts=3, num_experts_per_tok=2, block_size=16,
              layer_types=MIXED, max_position_embeddings=256, initializer_range=0.1,
              full_attn_alpha_factor=0.7, linear_attn_beta_factor=1.3, mlp_alpha_factor=0.9, mlp_beta_factor=1.1)
    kw.update(overrides)
    return MiniMaxConfig(**kw)


def random_hf_model(folder, seed=0, **overrides):
    """A random transformers MiniMax (norm weights perturbed off 1) saved with save_pretrained into `folder`."""
    torch.manual_seed(seed)
    model = MiniMaxForCausalLM(hf_config(**overrides)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.2 * torch.randn_like(p))
    model.save_pretrained(folder)
    return model


def params_from_folder(folder):
    """(config, params) read with the converter's tensor specs (the oracle path for the model tests; the
    `longtrain.hf.import_hf` driver itself is tested in test_minimax_hf.py)."""
    import json
    import os

    with open(os.path.join(folder, "config.json")) as fh:
        config = MINIMAX.config_from_hf(json.load(fh))
    reader = SafetensorsReader(folder)
    params = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype),
                          jax.eval_shape(lambda: models.init(config, jax.random.key(0))))
    for spec in MINIMAX.tensor_specs(config):
        leaf = params
        for key in spec.path:
            leaf = leaf[key]
        leaf[... if spec.layer is None else spec.layer] = spec.to_params(reader.read(spec.hf_name))
    return config, params


def hf_logits(model, tokens):
    with torch.no_grad():
        return model(torch.tensor(np.asarray(tokens))).logits.numpy()


def holding(make, params):
    """The module `make()` builds, holding `params` (a pure dict of its state) instead of random values."""
    return nnx.merge(nnx.graphdef(nnx.eval_shape(make)), params)


def assert_close(ours, ref, tol=1e-4):
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    scale = max(1.0, float(np.abs(ref).max()))
    assert np.abs(ours - ref).max() <= tol * scale, (np.abs(ours - ref).max(), scale)


def small_config(**kw):
    base = dict(architecture="minimax", vocab_size=61, hidden_size=E, intermediate_size=I, num_layers=4,
                num_heads=H, num_kv_heads=2, head_dim=D, layer_types=MIXED, lightning_block_size=16, num_experts=3,
                experts_per_token=2, init_std=0.1, linear_attn_alpha_factor=0.8, mlp_beta_factor=1.2)
    base.update(kw)
    return ModelConfig(**base)


# ------------------------------------------------------------------------------------------- layer level
@pytest.mark.parametrize("num_heads,num_layers", [(4, 4), (12, 7), (8, 1)])
def test_slopes_match_transformers(num_heads, num_layers):
    cfg = MiniMaxConfig(hidden_size=num_heads * 8, num_attention_heads=num_heads, num_key_value_heads=num_heads,
                        num_hidden_layers=num_layers, block_size=8, layer_types=["linear_attention"] * num_layers)
    for layer in range(num_layers):
        ref = hf_minimax.MiniMaxLightningAttention(cfg, layer).get_slope_rate().flatten().numpy()
        np.testing.assert_allclose(lightning_slopes(num_heads, layer, num_layers), ref, rtol=1e-6)


@pytest.mark.parametrize("layer_index", [0, 2])
def test_lightning_block_matches_transformers_module(layer_index):
    cfg = hf_config(num_hidden_layers=3, layer_types=["linear_attention"] * 3)
    torch.manual_seed(layer_index)
    block = hf_minimax.MiniMaxLightningAttention(cfg, layer_index)
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(2, 40, E)  # 40 tokens > 2 lightning blocks of 16
    with torch.no_grad():
        ref = block(x, None, None)[0].numpy()
    ours_cfg = small_config(num_layers=3, layer_types=["linear_attention"] * 3)
    params = {
        "qkv": {"kernel": jnp.asarray(block.qkv_proj.weight.detach().numpy().T.reshape(E, H, 3, D))},
        "output_gate": {"kernel": jnp.asarray(block.output_gate.weight.detach().numpy().T.reshape(E, H, D))},
        "norm": {"scale": jnp.asarray(block.norm.weight.detach().numpy().reshape(H, D))},
        "out_proj": {"kernel": jnp.asarray(block.out_proj.weight.detach().numpy().T.reshape(H, D, E))},
    }
    slope_H = jnp.asarray(lightning_slopes(H, layer_index, 3))
    make = lambda: Lightning(ours_cfg, rngs=nnx.Rngs(0))  # noqa: E731
    ours = jax.jit(lambda p, x: holding(make, p)(x, slope_H=slope_H, segment_ids=None,
                                                 runtime=attention_site.LocalRuntime()))(params, jnp.asarray(x.numpy()))
    assert_close(ours, ref, tol=1e-5)


def _moe_params_from_hf(block):
    gate_up = block.experts.gate_up_proj.detach().numpy()  # [X, 2I, E]: gate rows then up rows
    inter = gate_up.shape[1] // 2
    return {"router": {"kernel": jnp.asarray(block.gate.weight.detach().numpy().T)},
            "experts": {"gate": jnp.asarray(gate_up[:, :inter].transpose(0, 2, 1)),
                        "up": jnp.asarray(gate_up[:, inter:].transpose(0, 2, 1)),
                        "down": jnp.asarray(block.experts.down_proj.detach().numpy().transpose(0, 2, 1))}}


@pytest.mark.parametrize("num_experts,top_k", [(3, 2), (1, 1), (4, 4)])
@pytest.mark.parametrize("impl", ["dense", "ragged"])
def test_moe_matches_transformers_module(num_experts, top_k, impl):
    torch.manual_seed(num_experts)
    block = hf_minimax.MiniMaxSparseMoeBlock(hf_config(num_local_experts=num_experts, num_experts_per_tok=top_k))
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(2, 20, E)
    with torch.no_grad():
        ref = block(x.clone()).numpy()
    cfg = small_config(num_experts=num_experts, experts_per_token=top_k, moe_impl=impl)
    make = lambda: moe.MoE(cfg, rngs=nnx.Rngs(0))  # noqa: E731
    ours = jax.jit(lambda p, x: holding(make, p)(x))(_moe_params_from_hf(block), jnp.asarray(x.numpy()))
    assert_close(ours, ref, tol=1e-5)


def test_moe_ragged_gradient_equals_dense():
    cfg = small_config(num_experts=4, experts_per_token=2)
    params = nnx.to_pure_dict(nnx.state(moe.MoE(dataclasses.replace(cfg, init_std=0.3), rngs=nnx.Rngs(1))))
    x = jax.random.normal(jax.random.key(2), (2, 16, E))
    cot = jax.random.normal(jax.random.key(3), (2, 16, E))

    @jax.jit
    def vjp_both(params, x, cot):
        def one(impl):
            make = lambda: moe.MoE(dataclasses.replace(cfg, moe_impl=impl), rngs=nnx.Rngs(0))  # noqa: E731
            out, pull = jax.vjp(lambda p, x: holding(make, p)(x), params, x)
            return out, pull(cot)
        return one("dense"), one("ragged")

    (out_d, g_d), (out_r, g_r) = vjp_both(params, x, cot)
    assert_close(out_r, out_d, tol=1e-5)
    for a, b in zip(jax.tree.leaves(g_r), jax.tree.leaves(g_d)):
        assert_close(a, b, tol=1e-5)


# ------------------------------------------------------------------------------------------- model level
@pytest.mark.parametrize("variant", ["default", "scan_tied_window"])
def test_forward_matches_transformers(tmp_path, variant):
    overrides = {} if variant == "default" else {"tie_word_embeddings": True, "sliding_window": 12}
    model = random_hf_model(str(tmp_path), seed=1, **overrides)
    config, params = params_from_folder(str(tmp_path))
    if variant != "default":
        config = dataclasses.replace(config, scan_layers=True)
    tokens = np.random.RandomState(0).randint(0, 97, (2, 40))  # 40 > lightning block 16 and > window 12
    ref = hf_logits(model, tokens)
    assert np.abs(ref).max() > 0.5  # a non-trivial function
    assert_close(jax.jit(lambda p, t: models.forward(config, p, t))(params, jnp.asarray(tokens)), ref)


def test_packed_documents_equal_each_alone():
    """Row 0 packs documents a (23 tokens > one lightning block) and b (17); rows 1 and 2 hold each alone, followed
    by padding (segment 0, which causality keeps from touching the document). One compiled batch."""
    cfg = small_config(num_layers=2, layer_types=MIXED[:2])
    params = models.init(cfg, jax.random.key(0))
    rs = np.random.RandomState(1)
    a, b = rs.randint(0, 61, 23), rs.randint(0, 61, 17)
    junk = rs.randint(0, 61, 23)
    tokens = np.stack([np.r_[a, b], np.r_[a, junk[:17]], np.r_[b, junk]])
    seg = np.array([[1] * 23 + [2] * 17, [1] * 23 + [0] * 17, [1] * 17 + [0] * 23], np.int32)
    pos = np.stack([np.r_[np.arange(23), np.arange(17)], np.arange(40), np.arange(40)]).astype(np.int32)
    out = jax.jit(lambda p, t, s, q: models.forward_hidden(cfg, p, t, positions=q, segment_ids=s))(
        params, jnp.asarray(tokens), jnp.asarray(seg), jnp.asarray(pos))
    assert_close(out[0, :23], out[1, :23], tol=1e-5)
    assert_close(out[0, 23:], out[2, :17], tol=1e-5)
    assert np.all(np.isfinite(np.asarray(out)))


@pytest.mark.parametrize("scan", [False, True])
def test_two_chunks_with_kv_prefix_equal_one_pass(scan):
    """Row 0: one document crosses the chunk edge; row 1: a new document starts exactly at the edge (the carried
    lightning state must be dropped); row 2: a document continues across the edge after an earlier one."""
    # the scanned variant needs 2 repeats of the (lightning, softmax) period to exercise the stacked prefixes
    cfg = small_config(scan_layers=scan, sliding_window=20, num_layers=4 if scan else 2,
                       layer_types=MIXED if scan else MIXED[:2])
    params = models.init(cfg, jax.random.key(4))
    T, C = 40, 24
    tokens = jnp.asarray(np.random.RandomState(2).randint(0, 61, (3, T)))
    seg_np = np.array([[1] * T, [1] * C + [2] * (T - C), [1] * 10 + [2] * (T - 10)], np.int32)
    pos_np = np.stack([np.arange(T), np.r_[np.arange(C), np.arange(T - C)], np.r_[np.arange(10), np.arange(T - 10)]])
    seg, pos = jnp.asarray(seg_np), jnp.asarray(pos_np, jnp.int32)
    index = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (3, T))

    @jax.jit
    def run(params, tokens, pos, seg, index):
        full, kv_full = models.forward_hidden(cfg, params, tokens, positions=pos, segment_ids=seg, return_kv=True)
        h1, kv1 = models.forward_hidden(cfg, params, tokens[:, :C], positions=pos[:, :C], segment_ids=seg[:, :C],
                                        token_index=index[:, :C], return_kv=True)
        h2, kv2 = models.forward_hidden(cfg, params, tokens[:, C:], positions=pos[:, C:], segment_ids=seg[:, C:],
                                        token_index=index[:, C:], kv_prefix=kv1, return_kv=True)
        return full, kv_full, h1, kv1, h2, kv2

    full, kv_full, h1, kv1, h2, kv2 = run(params, tokens, pos, seg, index)
    assert set(kv1[0]) == {"state", "last_segment_id"} and kv1[0]["state"].shape == (3, H, D, D)
    assert set(kv1[1]) == {"k", "v", "segment_ids", "token_index"}
    assert_close(h1, full[:, :C], tol=1e-5)
    assert_close(h2, full[:, C:], tol=1e-5)
    # the state returned after chunk 2 equals the state of one pass over the whole sequence
    assert_close(kv2[0]["state"], kv_full[0]["state"], tol=1e-5)


def test_param_logical_axes_cover_params():
    cfg = small_config()
    params = models.init(cfg, jax.random.key(0))
    axes = models.param_logical_axes(cfg)
    is_axes = lambda t: isinstance(t, tuple)  # noqa: E731
    assert jax.tree.structure(params) == jax.tree.structure(axes, is_leaf=is_axes)
    for leaf, names in zip(jax.tree.leaves(params), jax.tree.leaves(axes, is_leaf=is_axes)):
        assert len(names) == leaf.ndim
    assert axes["layers"]["moe"]["experts"]["gate"] == ("layers", "experts", "embed", "mlp")
    assert params["layers"]["lightning"]["qkv"]["kernel"].shape == (2, E, H, 3, D)


def test_gradient_with_scan_and_remat_matches_plain():
    cfg = small_config(num_layers=2, layer_types=MIXED[:2])
    params = models.init(cfg, jax.random.key(5))
    tokens = jnp.asarray(np.random.RandomState(3).randint(0, 61, (1, 20)))

    def loss_fn(c):
        return lambda p: jnp.sum(models.forward(c, p, tokens) ** 2) * 1e-3

    remat_cfg = dataclasses.replace(cfg, remat="save_attention_output", scan_layers=True)
    g_plain = jax.jit(jax.grad(loss_fn(cfg)))(params)
    g_remat = jax.jit(jax.grad(loss_fn(remat_cfg)))(params)
    for a, b in zip(jax.tree.leaves(g_remat), jax.tree.leaves(g_plain)):
        assert np.all(np.isfinite(np.asarray(a)))
        assert_close(a, b, tol=1e-4)


def test_bad_layer_types_are_rejected():
    with pytest.raises(ValueError, match="layer_types"):
        models.init(small_config(layer_types=["linear_attention", "sliding_attention", "full_attention",
                                              "full_attention"]), jax.random.key(0))
    assert minimax.layer_period(["linear_attention"] * 7 + ["full_attention"]) == 8
    assert minimax.layer_period(MIXED) == 2
