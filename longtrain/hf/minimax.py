"""Hugging Face converter for `minimax` (transformers `MiniMaxForCausalLM`): config.json <-> ModelConfig and the
tensor-name mapping, in the format `save_pretrained` writes (and the Hub checkpoints use):

    model.layers.{l}.self_attn.qkv_proj.weight [H*3*D, E]   (lightning; per head [q_h | k_h | v_h])
                      self_attn.output_gate.weight [H*D, E], self_attn.norm.weight [H*D], self_attn.out_proj.weight
                      self_attn.{slope_rate, query_decay, key_decay, diagonal_decay}   (derived decay buffers)
    model.layers.{l}.self_attn.{q,k,v,o}_proj.weight          (softmax layers, as Llama without biases)
    model.layers.{l}.block_sparse_moe.gate.weight [X, E]
    model.layers.{l}.block_sparse_moe.experts.{x}.w1/w3.weight [I, E] (gate / up), w2.weight [E, I] (down)

Expert tensors map to one (layer, expert) slice of a stacked leaf, so their `TensorSpec.layer` is the index tuple
`(layer, expert)`. The decay buffers are functions of the config only: `derived_tensors(config)` lists them, import
checks a checkpoint's values against our slope schedule (a checkpoint with another schedule fails, naming file and
tensor) and export writes them so `from_pretrained` finds every key.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from longtrain.config import ModelConfig
from longtrain.hf.llama_family import (_Fields, _heads_to_linear, decoder_fields_to_hf, _heads_to_out, _linear_to_heads,
                                       _out_to_heads, _rope_from_hf, _same, _transpose)
from longtrain.hf.registry import TensorSpec, UnsupportedConfigError
from longtrain.hf.safetensors_io import CheckpointFormatError
from longtrain.models.lightning_block import lightning_slopes
from longtrain.models.minimax import FULL, LINEAR, index_within_type, resolved_layer_types

HF_LIGHTNING_NORM_EPS = 1e-6  # transformers builds the lightning output norm with its default eps
# HF keys read only by training-time code paths we do not mirror, checked to have their no-op value
_NO_OP_VALUES = {"attention_dropout": (0, 0.0, None), "router_jitter_noise": (0, 0.0, None),
                 "hidden_act": ("silu",), "output_router_logits": (False, None)}
_FACTORS = ("full_attn_alpha_factor", "full_attn_beta_factor", "linear_attn_alpha_factor", "linear_attn_beta_factor",
            "mlp_alpha_factor", "mlp_beta_factor")


@dataclasses.dataclass(frozen=True)
class DerivedTensor:
    """An HF tensor computed from the config alone (no params leaf): written on export, checked on import."""

    hf_name: str
    hf_shape: tuple[int, ...]
    produce: Callable[[], np.ndarray]

    def check(self, hf_array: np.ndarray, source: str) -> None:
        expected = self.produce()
        if hf_array.shape != expected.shape or not np.allclose(hf_array.astype(np.float64), expected, rtol=1e-5,
                                                                atol=1e-7):
            raise CheckpointFormatError(
                f"{source}: tensor {self.hf_name!r} does not match the MiniMax decay schedule that longtrain "
                f"computes from config.json (shape {list(hf_array.shape)}, expected {list(expected.shape)}); a "
                f"checkpoint with another schedule is not supported")


def decay_buffer(name: str, slope_H: np.ndarray, block_size: int) -> np.ndarray:
    """One of transformers' `MiniMaxLightningAttention` buffers (fp32) for one layer's slopes."""
    slope = slope_H.astype(np.float32)[:, None, None]                       # [H, 1, 1]
    steps = (np.arange(block_size) + 1).astype(np.float32)
    if name == "slope_rate":
        return slope
    if name == "query_decay":
        return np.exp(-slope * steps[:, None]).astype(np.float32)                  # [H, Bs, 1]
    if name == "key_decay":
        return np.exp(-slope * (block_size - steps[:, None])).astype(np.float32)   # [H, Bs, 1]
    if name == "diagonal_decay":
        diff = steps[:, None] - steps[None, :]                                     # [Bs, Bs]
        with np.errstate(over="ignore"):
            return np.exp(np.where(diff >= 0, -slope[None] * diff, -np.inf)).astype(np.float32)  # [1, H, Bs, Bs]
    raise ValueError(f"unknown MiniMax decay buffer {name!r}")


class MiniMaxConverter:
    model_type = "minimax"
    architecture_class = "MiniMaxForCausalLM"

    # ---------------------------------------------------------------------------------------------- config
    def config_from_hf(self, hf: dict, source: str = "config.json") -> ModelConfig:
        f = _Fields(hf, source, self.model_type)
        for key, allowed in _NO_OP_VALUES.items():
            f.expect(key, allowed, default=allowed[0])
        hidden, heads = f.require("hidden_size"), f.require("num_attention_heads")
        num_layers = f.require("num_hidden_layers")
        experts = f.take("num_local_experts", 8)
        alias = f.take("num_experts")
        if alias is not None and alias != experts:
            raise UnsupportedConfigError(f"{source}: num_experts={alias} disagrees with num_local_experts={experts}")
        theta, scaling = _rope_from_hf(f)
        layer_types = f.take("layer_types")
        if layer_types is None:  # the transformers default: even layers softmax, odd layers lightning
            layer_types = [FULL if (i + 1) % 2 else LINEAR for i in range(num_layers)]
        bad = sorted({t for t in layer_types if t not in (LINEAR, FULL)})
        if bad:
            raise UnsupportedConfigError(f"{source}: layer_types entries {bad} are not supported; minimax layers "
                                         f"are {LINEAR!r} or {FULL!r}")
        eos = f.take("eos_token_id", 2)
        init_std = f.take("initializer_range", 0.02)
        config = ModelConfig(
            architecture="minimax",
            vocab_size=f.require("vocab_size"), hidden_size=hidden, intermediate_size=f.require("intermediate_size"),
            num_layers=num_layers, num_heads=heads, num_kv_heads=f.take("num_key_value_heads") or heads,
            head_dim=f.take("head_dim") or hidden // heads,
            max_position_embeddings=f.take("max_position_embeddings", 4096 * 32), rope_theta=theta,
            rope_scaling=scaling, rms_norm_eps=f.take("rms_norm_eps", 1e-5),
            tie_embeddings=bool(f.take("tie_word_embeddings", False)), sliding_window=f.take("sliding_window"),
            layer_types=list(layer_types), lightning_block_size=f.take("block_size", 256),
            num_experts=experts, experts_per_token=f.take("num_experts_per_tok", 2),
            router_aux_loss_coef=f.take("router_aux_loss_coef", 0.001),
            lightning_norm_eps=HF_LIGHTNING_NORM_EPS,
            init_std=init_std if init_std and init_std > 0 else 0.02,
            bos_token_id=f.take("bos_token_id", 1), pad_token_id=f.take("pad_token_id"),
            eos_token_id=None if eos is None else ([eos] if isinstance(eos, int) else list(eos)),
            **{key: float(f.take(key, 1.0)) for key in _FACTORS},
        )
        f.finish()
        return config

    def config_to_hf(self, config: ModelConfig) -> dict:
        if config.architecture != self.model_type:
            raise UnsupportedConfigError(f"config.architecture={config.architecture!r} given to the minimax exporter")
        problems = []
        if config.lightning_norm_eps != HF_LIGHTNING_NORM_EPS:
            problems.append(f"lightning_norm_eps={config.lightning_norm_eps} (transformers fixes it at 1e-6)")
        for name, want in (("attention_bias", False), ("attention_out_bias", False), ("mlp_bias", False),
                           ("qk_norm", False), ("partial_rotary_factor", 1.0)):
            if getattr(config, name) != want:
                problems.append(f"{name}={getattr(config, name)}")
        if problems:
            raise UnsupportedConfigError(f"model fields {problems} cannot be expressed in a Hugging Face 'minimax' "
                                         f"config")
        return {
            **decoder_fields_to_hf(config), "sliding_window": config.sliding_window,
            "layer_types": resolved_layer_types(config), "block_size": config.lightning_block_size,
            "num_local_experts": config.num_experts, "num_experts_per_tok": config.experts_per_token,
            "router_aux_loss_coef": config.router_aux_loss_coef, "router_jitter_noise": 0.0,
            "output_router_logits": False,
            **{key: getattr(config, key) for key in _FACTORS},
        }

    # ---------------------------------------------------------------------------------------------- tensors
    def tensor_specs(self, config: ModelConfig) -> list[TensorSpec]:
        E, V, I, X = config.hidden_size, config.vocab_size, config.intermediate_size, config.num_experts
        Hq, Hkv, D = config.num_heads, config.num_kv_heads, config.resolved_head_dim
        types = resolved_layer_types(config)
        within = index_within_type(types)
        specs = [TensorSpec("model.embed_tokens.weight", ("embed", "embedding"), None, (V, E), _same, _same),
                 TensorSpec("model.norm.weight", ("final_norm", "scale"), None, (E,), _same, _same)]
        if not config.tie_embeddings:
            specs.append(TensorSpec("lm_head.weight", ("lm_head", "kernel"), None, (V, E), _transpose, _transpose))
        for l, layer_type in enumerate(types):
            pre = f"model.layers.{l}."

            def add(name, path, index, hf_shape, to_params, to_hf):
                specs.append(TensorSpec(pre + name, ("layers",) + path, index, hf_shape, to_params, to_hf))

            add("input_layernorm.weight", ("input_norm", "scale"), l, (E,), _same, _same)
            add("post_attention_layernorm.weight", ("post_attn_norm", "scale"), l, (E,), _same, _same)
            m = within[l]
            if layer_type == LINEAR:
                add("self_attn.qkv_proj.weight", ("lightning", "qkv", "kernel"), m, (Hq * 3 * D, E),
                    lambda w: np.ascontiguousarray(w.T).reshape(E, Hq, 3, D),
                    lambda k: np.ascontiguousarray(k.reshape(E, Hq * 3 * D).T))
                add("self_attn.output_gate.weight", ("lightning", "output_gate", "kernel"), m, (Hq * D, E),
                    _linear_to_heads(E, Hq, D), _heads_to_linear(E, Hq, D))
                add("self_attn.norm.weight", ("lightning", "norm", "scale"), m, (Hq * D,),
                    lambda w: w.reshape(Hq, D), lambda s: s.reshape(Hq * D))
                add("self_attn.out_proj.weight", ("lightning", "out_proj", "kernel"), m, (E, Hq * D),
                    _out_to_heads(E, Hq, D), _heads_to_out(E, Hq, D))
            else:
                for proj, heads in (("q_proj", Hq), ("k_proj", Hkv), ("v_proj", Hkv)):
                    add(f"self_attn.{proj}.weight", ("attn", proj, "kernel"), m, (heads * D, E),
                        _linear_to_heads(E, heads, D), _heads_to_linear(E, heads, D))
                add("self_attn.o_proj.weight", ("attn", "o_proj", "kernel"), m, (E, Hq * D),
                    _out_to_heads(E, Hq, D), _heads_to_out(E, Hq, D))
            add("block_sparse_moe.gate.weight", ("moe", "router", "kernel"), l, (X, E), _transpose, _transpose)
            for x in range(X):
                for hf_w, leaf, shape in (("w1", "gate", (I, E)), ("w3", "up", (I, E)), ("w2", "down", (E, I))):
                    add(f"block_sparse_moe.experts.{x}.{hf_w}.weight", ("moe", "experts", leaf), (l, x), shape,
                        _transpose, _transpose)
        return specs

    def derived_tensors(self, config: ModelConfig) -> list[DerivedTensor]:
        """The lightning layers' decay buffers (`self_attn.{slope_rate,query_decay,key_decay,diagonal_decay}`)."""
        types, H, Bs = resolved_layer_types(config), config.num_heads, config.lightning_block_size
        shapes = {"slope_rate": (H, 1, 1), "query_decay": (H, Bs, 1), "key_decay": (H, Bs, 1),
                  "diagonal_decay": (1, H, Bs, Bs)}
        out = []
        for l, layer_type in enumerate(types):
            if layer_type != LINEAR:
                continue
            for name, shape in shapes.items():
                def produce(l=l, name=name):
                    return decay_buffer(name, lightning_slopes(H, l, config.num_layers), Bs)

                out.append(DerivedTensor(f"model.layers.{l}.self_attn.{name}", shape, produce))
        return out


MINIMAX = MiniMaxConverter()
