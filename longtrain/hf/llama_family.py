"""Hugging Face converters for the Llama family: llama, mistral, qwen2, qwen3 (config.json <-> ModelConfig and the
tensor-name mapping). One table row per architecture says which bias/norm/window fields it has.

Config fields are handled strictly: each key of config.json is either consumed into `ModelConfig`, checked to have
the one value we can represent (e.g. `hidden_act: silu`), or listed as having no effect on the function
(`use_cache`, `transformers_version`, ...). Anything else raises `UnsupportedConfigError` naming the key(s).
"""
from __future__ import annotations

import dataclasses

import numpy as np

from longtrain.config import ModelConfig, RopeScalingConfig
from longtrain.hf.registry import TensorSpec, UnsupportedConfigError


@dataclasses.dataclass(frozen=True)
class FamilyRules:
    architecture_class: str
    qkv_bias_key: str | None       # config key of the q/k/v bias flag (None: fixed by `qkv_bias_fixed`)
    qkv_bias_fixed: bool
    out_bias_key: str | None       # config key of the o_proj bias flag (None: no o_proj bias)
    has_mlp_bias: bool
    qk_norm: bool
    sliding: str                   # "none" | "mistral" (sliding_window) | "qwen" (use_sliding_window + layer_types)


RULES = {
    "llama": FamilyRules("LlamaForCausalLM", "attention_bias", False, "attention_bias", True, False, "none"),
    "mistral": FamilyRules("MistralForCausalLM", None, False, None, False, False, "mistral"),
    "qwen2": FamilyRules("Qwen2ForCausalLM", None, True, None, False, False, "qwen"),
    "qwen3": FamilyRules("Qwen3ForCausalLM", "attention_bias", False, "attention_bias", False, True, "qwen"),
}

# Keys with no effect on the model function (runtime / bookkeeping only).
NO_EFFECT_KEYS = {"architectures", "model_type", "transformers_version", "torch_dtype", "dtype", "use_cache",
                  "_name_or_path", "output_attentions", "output_hidden_states", "return_dict", "tokenizer_class",
                  "_attn_implementation_autoset"}

ROPE_KEYS_BY_TYPE = {
    "none": set(),
    "linear": {"factor"},
    "dynamic": {"factor"},
    "yarn": {"factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "attention_factor", "mscale",
             "mscale_all_dim", "truncate"},
    "llama3": {"factor", "original_max_position_embeddings", "low_freq_factor", "high_freq_factor"},
}


class _Fields:
    """A config.json dict consumed key by key, so leftovers can be reported."""

    def __init__(self, d: dict, source: str, model_type: str):
        self.d, self.source, self.model_type = dict(d), source, model_type

    def take(self, key, default=None):
        return self.d.pop(key, default)

    def require(self, key):
        if key not in self.d:
            raise UnsupportedConfigError(f"{self.source}: required field {key!r} is missing ({self.model_type})")
        return self.d.pop(key)

    def expect(self, key, allowed, default=None):
        """Consume `key`; its value (or `default` when absent) must be one of `allowed`."""
        value = self.d.pop(key, default)
        if value not in allowed:
            raise UnsupportedConfigError(f"{self.source}: {key}={value!r} is not supported for model_type "
                                         f"{self.model_type!r}; supported: {allowed}")
        return value

    def finish(self):
        for key in NO_EFFECT_KEYS:
            self.d.pop(key, None)
        if self.d:
            raise UnsupportedConfigError(f"{self.source}: unsupported config field(s) for model_type "
                                         f"{self.model_type!r}: {sorted(self.d)} (longtrain would silently ignore "
                                         f"them; refusing)")


def _rope_from_hf(f: _Fields) -> tuple[float, RopeScalingConfig]:
    params = f.take("rope_parameters")
    legacy = f.take("rope_scaling")
    legacy_theta = f.take("rope_theta")
    if params is None:
        params = dict(legacy or {})
        if legacy_theta is not None:
            params.setdefault("rope_theta", legacy_theta)
    params = dict(params)
    kind = params.pop("rope_type", None) or params.pop("type", None) or "default"
    params.pop("type", None)
    theta = float(params.pop("rope_theta", legacy_theta if legacy_theta is not None else 10000.0))
    kind = "none" if kind == "default" else kind
    if kind not in ROPE_KEYS_BY_TYPE:
        raise UnsupportedConfigError(f"{f.source}: rope_parameters.rope_type={kind!r} is not supported; supported: "
                                     f"default, linear, dynamic, yarn, llama3")
    partial = params.pop("partial_rotary_factor", None)
    if partial not in (None, 1, 1.0):
        raise UnsupportedConfigError(f"{f.source}: rope_parameters.partial_rotary_factor={partial!r} is not "
                                     f"supported for model_type {f.model_type!r} (full rotary only)")
    extra = set(params) - ROPE_KEYS_BY_TYPE[kind]
    if extra:
        raise UnsupportedConfigError(f"{f.source}: rope_parameters field(s) {sorted(extra)} are not used by "
                                     f"rope_type {kind!r}; refusing to drop them")
    scaling = RopeScalingConfig(type=kind, **{k: (int(v) if k == "original_max_position_embeddings" else v)
                                              for k, v in params.items()})
    return theta, scaling


def _rope_to_hf(config: ModelConfig) -> dict:
    s = config.rope_scaling
    out = {"rope_type": "default" if s.type == "none" else s.type, "rope_theta": config.rope_theta}
    for key in sorted(ROPE_KEYS_BY_TYPE[s.type]):
        value = getattr(s, key)
        if value is not None:
            out[key] = value
    return out


class LlamaFamilyConverter:
    def __init__(self, model_type: str):
        self.model_type = model_type
        self.rules = RULES[model_type]
        self.architecture_class = self.rules.architecture_class

    # ---------------------------------------------------------------------------------------------- config
    def config_from_hf(self, hf: dict, source: str = "config.json") -> ModelConfig:
        r, f = self.rules, _Fields(hf, source, self.model_type)
        f.expect("hidden_act", ("silu",), default="silu")
        f.expect("attention_dropout", (0, 0.0, None), default=0.0)
        f.expect("pretraining_tp", (1, None), default=1)
        hidden, heads = f.require("hidden_size"), f.require("num_attention_heads")
        kv_heads = f.take("num_key_value_heads") or heads
        head_dim = f.take("head_dim") or hidden // heads
        theta, scaling = _rope_from_hf(f)
        if f.take("partial_rotary_factor") not in (None, 1, 1.0):
            raise UnsupportedConfigError(f"{source}: partial_rotary_factor != 1 is not supported for "
                                         f"{self.model_type!r}")
        qkv_bias = bool(f.take(r.qkv_bias_key, False)) if r.qkv_bias_key else r.qkv_bias_fixed
        out_bias = qkv_bias if r.out_bias_key else False
        mlp_bias = bool(f.take("mlp_bias", False)) if r.has_mlp_bias else False
        sliding_window = self._sliding_from_hf(f)
        eos = f.take("eos_token_id")
        init_std = f.take("initializer_range", 0.02)
        config = ModelConfig(
            architecture=self.model_type,
            vocab_size=f.require("vocab_size"), hidden_size=hidden, intermediate_size=f.require("intermediate_size"),
            num_layers=f.require("num_hidden_layers"), num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim,
            max_position_embeddings=f.take("max_position_embeddings", 2048), rope_theta=theta, rope_scaling=scaling,
            rms_norm_eps=f.take("rms_norm_eps", 1e-6), tie_embeddings=bool(f.take("tie_word_embeddings", False)),
            attention_bias=qkv_bias, attention_out_bias=out_bias, mlp_bias=mlp_bias, qk_norm=r.qk_norm,
            sliding_window=sliding_window, init_std=init_std if init_std and init_std > 0 else 0.02,
            bos_token_id=f.take("bos_token_id"), pad_token_id=f.take("pad_token_id"),
            eos_token_id=None if eos is None else ([eos] if isinstance(eos, int) else list(eos)),
        )
        f.finish()
        return config

    def _sliding_from_hf(self, f: _Fields):
        kind = self.rules.sliding
        if kind == "mistral":
            return f.take("sliding_window")
        if kind == "qwen":
            use = f.expect("use_sliding_window", (False, None), default=False)
            f.take("sliding_window")       # only read by HF when use_sliding_window
            f.take("max_window_layers")    # idem
            layer_types = f.take("layer_types")
            if layer_types is not None and any(t != "full_attention" for t in layer_types):
                raise UnsupportedConfigError(f"{f.source}: layer_types={layer_types!r}: only full_attention layers "
                                             f"are supported for {self.model_type!r}")
            del use
        return None

    def config_to_hf(self, config: ModelConfig) -> dict:
        r = self.rules
        if config.architecture != self.model_type:
            raise UnsupportedConfigError(f"config.architecture={config.architecture!r} given to the "
                                         f"{self.model_type!r} exporter")
        self._check_exportable(config)
        out = decoder_fields_to_hf(config)
        if r.qkv_bias_key:
            out[r.qkv_bias_key] = config.attention_bias
        if r.has_mlp_bias:
            out["mlp_bias"] = config.mlp_bias
        if r.sliding == "mistral":
            out["sliding_window"] = config.sliding_window
        elif r.sliding == "qwen":
            out.update(use_sliding_window=False, sliding_window=None,
                       layer_types=["full_attention"] * config.num_layers)
        return out

    def _check_exportable(self, config: ModelConfig) -> None:
        r, problems = self.rules, []
        want_qkv = config.attention_bias if r.qkv_bias_key else r.qkv_bias_fixed
        want_out = config.attention_bias if r.out_bias_key else False
        if config.attention_bias != want_qkv:
            problems.append(f"attention_bias={config.attention_bias}")
        if config.attention_out_bias != want_out:
            problems.append(f"attention_out_bias={config.attention_out_bias}")
        if config.mlp_bias and not r.has_mlp_bias:
            problems.append("mlp_bias=True")
        if config.qk_norm != r.qk_norm:
            problems.append(f"qk_norm={config.qk_norm}")
        if config.sliding_window is not None and r.sliding != "mistral":
            problems.append(f"sliding_window={config.sliding_window}")
        if config.partial_rotary_factor != 1.0:
            problems.append(f"partial_rotary_factor={config.partial_rotary_factor}")
        if config.layer_types is not None or config.num_experts != 1:
            problems.append("layer_types/num_experts (hybrid or MoE fields)")
        if problems:
            raise UnsupportedConfigError(f"model fields {problems} cannot be expressed in a Hugging Face "
                                         f"{self.model_type!r} config")

    # ---------------------------------------------------------------------------------------------- tensors
    def tensor_specs(self, config: ModelConfig) -> list[TensorSpec]:
        E, V, F = config.hidden_size, config.vocab_size, config.intermediate_size
        Hq, Hkv, D = config.num_heads, config.num_kv_heads, config.resolved_head_dim
        specs = [TensorSpec("model.embed_tokens.weight", ("embed", "embedding"), None, (V, E), _same, _same),
                 TensorSpec("model.norm.weight", ("final_norm", "scale"), None, (E,), _same, _same)]
        if not config.tie_embeddings:
            specs.append(TensorSpec("lm_head.weight", ("lm_head", "kernel"), None, (V, E), _transpose, _transpose))
        for i in range(config.num_layers):
            pre = f"model.layers.{i}."

            def add(name, path, hf_shape, to_params, to_hf):
                specs.append(TensorSpec(pre + name, ("layers",) + path, i, hf_shape, to_params, to_hf))

            add("input_layernorm.weight", ("input_norm", "scale"), (E,), _same, _same)
            add("post_attention_layernorm.weight", ("post_attn_norm", "scale"), (E,), _same, _same)
            for proj, heads in (("q_proj", Hq), ("k_proj", Hkv), ("v_proj", Hkv)):
                add(f"self_attn.{proj}.weight", ("attn", proj, "kernel"), (heads * D, E),
                    _linear_to_heads(E, heads, D), _heads_to_linear(E, heads, D))
                if config.attention_bias:
                    add(f"self_attn.{proj}.bias", ("attn", proj, "bias"), (heads * D,),
                        _reshape((heads, D)), _reshape((heads * D,)))
            add("self_attn.o_proj.weight", ("attn", "o_proj", "kernel"), (E, Hq * D),
                _out_to_heads(E, Hq, D), _heads_to_out(E, Hq, D))
            if config.attention_out_bias:
                add("self_attn.o_proj.bias", ("attn", "o_proj", "bias"), (E,), _same, _same)
            if config.qk_norm:
                add("self_attn.q_norm.weight", ("attn", "q_norm", "scale"), (D,), _same, _same)
                add("self_attn.k_norm.weight", ("attn", "k_norm", "scale"), (D,), _same, _same)
            for proj, shape in (("gate_proj", (F, E)), ("up_proj", (F, E)), ("down_proj", (E, F))):
                add(f"mlp.{proj}.weight", ("mlp", proj, "kernel"), shape, _transpose, _transpose)
                if config.mlp_bias:
                    add(f"mlp.{proj}.bias", ("mlp", proj, "bias"), (shape[0],), _same, _same)
        return specs


def _eos_to_hf(eos):
    if eos is None:
        return None
    return eos[0] if len(eos) == 1 else list(eos)


def decoder_fields_to_hf(config: ModelConfig) -> dict:
    """The config.json fields every decoder architecture we export shares (sizes, RoPE, norms, token ids)."""
    return {
        "vocab_size": config.vocab_size, "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size, "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads, "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.resolved_head_dim, "hidden_act": "silu",
        "max_position_embeddings": config.max_position_embeddings, "rms_norm_eps": config.rms_norm_eps,
        "rope_parameters": _rope_to_hf(config), "tie_word_embeddings": config.tie_embeddings,
        "initializer_range": config.init_std, "attention_dropout": 0.0,
        "bos_token_id": config.bos_token_id, "pad_token_id": config.pad_token_id,
        "eos_token_id": _eos_to_hf(config.eos_token_id), "use_cache": True,
    }


# Tensor transforms. HF nn.Linear.weight is [out, in]; our kernels are [in, *out].
def _same(a):
    return a


def _transpose(a):
    return np.ascontiguousarray(a.T)


def _reshape(shape):
    return lambda a: a.reshape(shape)


def _linear_to_heads(E, H, D):
    return lambda w: np.ascontiguousarray(w.T).reshape(E, H, D)        # [H*D, E] -> [E, H, D]


def _heads_to_linear(E, H, D):
    return lambda k: np.ascontiguousarray(k.reshape(E, H * D).T)       # [E, H, D] -> [H*D, E]


def _out_to_heads(E, H, D):
    return lambda w: np.ascontiguousarray(w.T).reshape(H, D, E)        # [E, H*D] -> [H, D, E]


def _heads_to_out(E, H, D):
    return lambda k: np.ascontiguousarray(k.reshape(H * D, E).T)       # [H, D, E] -> [E, H*D]


LLAMA = LlamaFamilyConverter("llama")
MISTRAL = LlamaFamilyConverter("mistral")
QWEN2 = LlamaFamilyConverter("qwen2")
QWEN3 = LlamaFamilyConverter("qwen3")
