"""The MiniMax hybrid decoder (transformers `MiniMaxForCausalLM`) as Flax NNX modules: lightning and softmax
layers with MoE MLPs.

Each layer (`config.layer_types[l]` = "linear_attention" -> lightning, "full_attention" -> softmax), with the
residual taken AFTER the input norm, as transformers does:

    h = rms(x);  x = alpha_attn * h + beta_attn * mixer(h)     # (linear|full)_attn_(alpha|beta)_factor
    h = rms(x);  x = alpha_mlp * h + beta_mlp * moe(h)         # mlp_(alpha|beta)_factor

then a final RMSNorm and the LM head. Softmax layers are `models/attention.py` (RoPE, GQA, optional sliding window);
lightning layers are `models/lightning_block.py`; the MLP is `models/moe.py`.

State (`nnx.to_pure_dict` keys, `config.param_dtype`), every per-layer leaf stacked on a leading `layers` axis:
    embed.embedding [V, E], final_norm.scale [E], lm_head.kernel [E, V] (absent when tied)
    layers.input_norm.scale [L, E], layers.post_attn_norm.scale [L, E], layers.moe.* [L, ...] (moe.py)
    layers.lightning.* [L_lin, ...] (lightning_block.py; the lightning layers in layer order; absent if none)
    layers.attn.*      [L_full, ...] (attention.py; the softmax layers in layer order; absent if none)
With `scan_layers`, `lax.scan` runs over the R = L / P repeats of the period P of `layer_types` (the smallest P
dividing L with layer_types[l] == layer_types[l % P], e.g. P=8 for 7 lightning + 1 softmax): each stack is viewed
as [R, per-period count, ...] (a free reshape), so the layout never depends on `scan_layers`.

Chunk-wise (SeCO) caches, one per layer: softmax layers as `models/attention.py`; lightning layers
`{"state": [B,H,D,D] fp32, "last_segment_id": [B]}`. A prefix state feeds this chunk's first run only where the
chunk's first segment id equals `last_segment_id` (when that key is absent the document is taken to continue);
`return_kv` gives this chunk's state at its last token and its last segment id, ready to be the next prefix.
`kv_prefix` may also be a `layer_stack.StackedCaches` whose stack holds the softmax layers' K/V [L_full, ...] (in
layer order) and whose `side` holds the lightning caches (in layer order): no copy of the stack is made, the period
scan views it as [R, softmax per period, ...], and each layer's K/V cotangent is added into `grad_sink` in place.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from longtrain.models import attention_site
from longtrain.models.attention import Attention
from longtrain.models.decoder import CausalLM, LayerInputs, check_heads
from longtrain.models.layer_stack import StackedCaches, layer_slice, remat, stack_layers, stacked_layer_fn
from longtrain.models.layers import RMSNorm, module_keys
from longtrain.models.lightning_block import Lightning, lightning_slopes
from longtrain.models.moe import MoE

LINEAR, FULL = "linear_attention", "full_attention"
__all__ = ["MiniMax", "MiniMaxLayers", "index_within_type", "layer_period", "resolved_layer_types"]


def resolved_layer_types(config) -> list[str]:
    """`config.layer_types`, or the transformers default (even layers softmax, odd layers lightning)."""
    if config.layer_types is None:
        return [FULL if (i + 1) % 2 else LINEAR for i in range(config.num_layers)]
    return list(config.layer_types)


def check_config(config) -> None:
    if config.architecture != "minimax":
        raise ValueError(f"models.minimax serves architecture 'minimax', not {config.architecture!r}")
    types = resolved_layer_types(config)
    if len(types) != config.num_layers:
        raise ValueError(f"model.layer_types has {len(types)} entries but model.num_layers={config.num_layers}")
    bad = sorted({t for t in types if t not in (LINEAR, FULL)})
    if bad:
        raise ValueError(f"model.layer_types has {bad}; minimax layers are {LINEAR!r} or {FULL!r}")
    if not 1 <= config.experts_per_token <= config.num_experts:
        raise ValueError(f"model.experts_per_token={config.experts_per_token} must be in "
                         f"[1, model.num_experts={config.num_experts}]")
    check_heads(config)


def layer_period(layer_types: list[str]) -> int:
    """Smallest P dividing len(layer_types) such that the pattern repeats every P layers."""
    L = len(layer_types)
    for P in range(1, L + 1):
        if L % P == 0 and all(layer_types[i] == layer_types[i % P] for i in range(L)):
            return P
    return L


def index_within_type(layer_types: list[str]) -> list[int]:
    """For each layer, its position in the stack of its own type (`layers.lightning` or `layers.attn`)."""
    seen = {LINEAR: 0, FULL: 0}
    out = []
    for t in layer_types:
        out.append(seen[t])
        seen[t] += 1
    return out


def _mixer_key(layer_type: str) -> str:
    return "lightning" if layer_type == LINEAR else "attn"


# --------------------------------------------------------------------------------------------------- modules
class MiniMaxLayers(nnx.Module):
    """Every layer's parameters, stacked by kind (see the module docstring): the norms and MoE of all L layers, the
    lightning mixers of the lightning layers and the attention of the softmax layers, each in layer order."""

    def __init__(self, config, *, keys):
        types, L, E, eps = resolved_layer_types(config), config.num_layers, config.hidden_size, config.rms_norm_eps
        k_moe, k_lin, k_attn = keys
        self.input_norm = stack_layers(lambda _: RMSNorm((E,), ("embed",), config, eps), L)
        self.post_attn_norm = stack_layers(lambda _: RMSNorm((E,), ("embed",), config, eps), L)
        self.moe = stack_layers(lambda k: MoE(config, key=k), L, k_moe)
        n_lin, n_full = types.count(LINEAR), types.count(FULL)
        self.lightning = stack_layers(lambda k: Lightning(config, key=k), n_lin, k_lin) if n_lin else None
        self.attn = stack_layers(lambda k: Attention(config, key=k), n_full, k_attn) if n_full else None


class MiniMax(CausalLM):
    """The MiniMax hybrid: `MiniMax(config, rngs=nnx.Rngs(0))(tokens) -> logits` (or `key=` a PRNG key)."""

    def __init__(self, config, *, rngs: nnx.Rngs | None = None, key=None):
        check_config(config)
        k_outer, *k_layers = module_keys(rngs, key, 4)
        super().__init__(config, key=k_outer)
        self.layers = MiniMaxLayers(config, keys=k_layers)

    def hidden(self, tokens_BT, *, positions=None, segment_ids=None, runtime=None, token_index=None,
               kv_prefix=None, return_kv=False):
        """tokens [B,T] -> final-norm hidden states [B,T,E] (and per-layer caches when `return_kv`)."""
        x_BTE, inputs = self.embed_inputs(tokens_BT, positions=positions, segment_ids=segment_ids,
                                          runtime=runtime, token_index=token_index, kv_prefix=kv_prefix,
                                          return_kv=return_kv)
        x_BTE, kvs = _run_hybrid_layers(self.config, self.layers, x_BTE, inputs, kv_prefix)
        hidden_BTE = self.final_norm(x_BTE)
        return (hidden_BTE, kvs) if return_kv else hidden_BTE


# -------------------------------------------------------------------------------------------------- forward
def _lightning_initial_state(prefix_l, segment_ids_BT, runtime):
    """The carried state, zeroed in rows whose first token starts a new document (see module docstring); the
    runtime knows which token is the chunk's first (under context parallelism another rank may hold it)."""
    if "state" not in prefix_l:
        raise KeyError("kv_prefix entry of a lightning layer lacks 'state' [B,H,D,D]")
    state = prefix_l["state"]
    state = state.astype(jnp.promote_types(state.dtype, jnp.float32))  # fp32 at least (fp64 stays fp64)
    if "last_segment_id" not in prefix_l:
        return state
    if segment_ids_BT is None:
        segment_ids_BT = jnp.ones(state.shape[:1] + (1,), jnp.int32)
    continues_B = attention_site.continues_document(runtime, prefix_l["last_segment_id"].astype(jnp.int32),
                                                    segment_ids_BT)
    return jnp.where(continues_B[:, None, None, None], state, 0.0)


def _make_layer_fn(config, layer_type: str, graphdefs: dict, inputs: LayerInputs):
    """layer(x, common_p, mixer_p, slope_H, prefix_l) -> (x, kv_l) for one layer of the given type (not remat'ed):
    `common_p` = this layer's (input_norm, post_attn_norm, moe) states, `mixer_p` its lightning or attention
    state; each is merged back into its module (`graphdefs`)."""
    if layer_type == LINEAR:
        alpha, beta = config.linear_attn_alpha_factor, config.linear_attn_beta_factor
    else:
        alpha, beta = config.full_attn_alpha_factor, config.full_attn_beta_factor
    segment_ids, runtime, return_kv = inputs.segment_ids, inputs.runtime, inputs.return_kv

    def layer(x_BTE, common_p, mixer_p, slope_H, prefix_l):
        common_p, mixer_p = attention_site.gather_layer(runtime, (common_p, mixer_p))
        input_norm, post_attn_norm, moe = (nnx.merge(g, p) for g, p in zip(graphdefs["common"], common_p))
        mixer = nnx.merge(graphdefs[layer_type], mixer_p)
        h_BTE = input_norm(x_BTE)
        kv = None
        if layer_type == LINEAR:
            init_state = None if prefix_l is None else _lightning_initial_state(prefix_l, segment_ids, runtime)
            mixed = mixer(h_BTE, slope_H=slope_H, segment_ids=segment_ids, runtime=runtime,
                          initial_state=init_state, return_state=return_kv)
            if return_kv:
                mixed, state = mixed
                last_seg = (segment_ids[:, -1] if segment_ids is not None
                            else jnp.ones(x_BTE.shape[:1], jnp.int32)).astype(jnp.int32)
                kv = {"state": state, "last_segment_id": last_seg}
        else:
            mixed = mixer(h_BTE, cos_sin=inputs.cos_sin, segment_ids=segment_ids, token_index=inputs.token_index,
                          runtime=runtime, prefix_kv=prefix_l, return_kv=return_kv,
                          sliding_window=config.sliding_window)
            if return_kv:
                mixed, kv = mixed
        # the residual is the NORMED input (transformers MiniMaxDecoderLayer), scaled by alpha
        x_BTE = alpha * h_BTE + beta * mixed
        h_BTE = post_attn_norm(x_BTE)
        x_BTE = config.mlp_alpha_factor * h_BTE + config.mlp_beta_factor * moe(h_BTE, runtime=runtime)
        return runtime.constrain(x_BTE.astype(h_BTE.dtype), ("batch", "seq", "embed")), kv

    return layer


def _check_prefix(kv_prefix, types: list[str]) -> None:
    if kv_prefix is None:
        return
    L = len(types)
    if not isinstance(kv_prefix, StackedCaches):
        if len(kv_prefix) != L:
            raise ValueError(f"kv_prefix has {len(kv_prefix)} entries; the model has {L} layers (one cache per layer)")
        return
    n_full, n_lin, n_side = types.count(FULL), types.count(LINEAR), len(kv_prefix.side or [])
    if len(kv_prefix) != n_full or n_side != n_lin:
        raise ValueError(f"kv_prefix (StackedCaches) stacks {len(kv_prefix)} softmax caches and has {n_side} side "
                         f"caches; the model has {n_full} softmax and {n_lin} lightning layers")


def _stacked_softmax_fn(layer, kv_prefix: StackedCaches, remat_policy: str, pick=None):
    """`layer_stack.stacked_layer_fn` for a softmax layer: (x, sink, (common_p, mixer_p, slope_H), stored, l)."""
    return stacked_layer_fn(lambda x, p, prefix_l: layer(x, *p, prefix_l), kv_prefix, remat_policy, pick)


def _run_hybrid_layers(config, layers: MiniMaxLayers, x_BTE, inputs: LayerInputs, kv_prefix):
    """All L layers (unrolled, or scanned over the repeats of the layer period) -> (x [B,T,E], caches or None)."""
    types = resolved_layer_types(config)
    L, P, return_kv = config.num_layers, layer_period(types), inputs.return_kv
    R = L // P
    _check_prefix(kv_prefix, types)
    stacked = isinstance(kv_prefix, StackedCaches)
    # the stacked modules as (graphdef, state [n, ...]); a layer merges its slices back into modules
    split = {name: nnx.split(getattr(layers, name)) for name in ("input_norm", "post_attn_norm", "moe")}
    graphdefs = {"common": tuple(split[n][0] for n in ("input_norm", "post_attn_norm", "moe"))}
    common = tuple(split[n][1] for n in ("input_norm", "post_attn_norm", "moe"))
    mixer_states = {}
    for t in set(types):
        graphdefs[t], mixer_states[t] = nnx.split(getattr(layers, _mixer_key(t)))
    raw_fns = {t: _make_layer_fn(config, t, graphdefs, inputs) for t in set(types)}
    layer_fns = {t: remat(f, config.remat) for t, f in raw_fns.items()}
    within = index_within_type(types)
    # per layer, the cache it reads from a list prefix or a StackedCaches' side list (None for stacked softmax)
    sink = kv_prefix.grad_sink if stacked else None
    if stacked:
        prefix_L = [kv_prefix.side[within[l]] if t == LINEAR else None for l, t in enumerate(types)]
    else:
        prefix_L = [None] * L if kv_prefix is None else list(kv_prefix)
    # decay slopes [L, H] (rows of softmax layers are unused zeros)
    slopes_LH = np.zeros((L, config.num_heads), np.float32)
    for l in range(L):
        if types[l] == LINEAR:
            slopes_LH[l] = lightning_slopes(config.num_heads, l, L)
    if not config.scan_layers:
        kvs = []
        softmax_fn = None
        if stacked and FULL in types:
            softmax_fn = _stacked_softmax_fn(raw_fns[FULL], kv_prefix, config.remat)
        for l, t in enumerate(types):
            layer_p = (layer_slice(common, l), layer_slice(mixer_states[t], within[l]), jnp.asarray(slopes_LH[l]))
            with jax.named_scope(f"layer_{l}"):  # op names say which layer (`plan --explain`, profiles)
                if stacked and t == FULL:
                    x_BTE, sink, kv = softmax_fn(x_BTE, sink, layer_p, layer_slice(kv_prefix.stacked, within[l]),
                                                 within[l])
                else:
                    x_BTE, kv = layer_fns[t](x_BTE, *layer_p, prefix_L[l])
            kvs.append(kv)
    else:
        def per_repeat(tree):  # [R * n, ...] -> [R, n, ...] (a free reshape)
            return jax.tree.map(lambda a: a.reshape(R, a.shape[0] // R, *a.shape[1:]), tree)

        mixers = {t: per_repeat(mixer_states[t]) for t in set(types)}
        # position j of the period -> caches of layers j, j+P, ... stacked over R (lists are small or O(layers);
        # a StackedCaches' softmax stack is instead viewed as [R, softmax per period, ...], no copy)
        prefix_P = [None if prefix_L[j] is None else jax.tree.map(lambda *a: jnp.stack(a), *prefix_L[j::P])
                    for j in range(P)]
        stored_R, n_full = None, types[:P].count(FULL)
        runs = []  # the period as runs of consecutive same-type positions: [(type, [j, ...]), ...]
        for j in range(P):
            if runs and runs[-1][0] == types[j]:
                runs[-1][1].append(j)
            else:
                runs.append((types[j], [j]))
        softmax_fns = {}
        if stacked and n_full:
            stored_R = per_repeat(kv_prefix.stacked)
            # the pick of a layer's slice out of [softmax per period, ...] sits inside its remat (see stacked_layer_fn)
            softmax_fns = {j: _stacked_softmax_fn(raw_fns[FULL], kv_prefix, config.remat, pick=within[j])
                           for j in range(P) if types[j] == FULL}

        def run_of_layers(x_BTE, t, js, common_g, mixers_g, slopes_PH, prefix_g):
            """Consecutive same-type positions js of the period as an inner scan: a loop boundary between layers
            makes XLA finish one layer's backward before the next (without it, XLA:CPU keeps every lightning
            layer's backward temporaries of the period live at once: ~4x the memory of full backprop)."""
            a, n = js[0], len(js)
            params_n = (jax.tree.map(lambda v: v[a:a + n], common_g),
                        jax.tree.map(lambda v: v[within[a]:within[a] + n], mixers_g[t]), slopes_PH[a:a + n])
            prefix_n = (None if prefix_g[a] is None
                        else jax.tree.map(lambda *v: jnp.stack(v), *[prefix_g[j] for j in js]))

            def one(x_BTE, xs):
                (common_p, mixer_p, slope_H), prefix_l = xs
                x_BTE, kv = layer_fns[t](x_BTE, common_p, mixer_p, slope_H, prefix_l)
                return x_BTE, (kv if return_kv else None)

            x_BTE, kv_n = jax.lax.scan(one, x_BTE, (params_n, prefix_n))
            return x_BTE, [layer_slice(kv_n, i) if return_kv else None for i in range(n)]

        def body(carry, xs):
            x_BTE, sink = carry
            common_g, mixers_g, slopes_PH, prefix_g, stored_g, r = xs
            kv_P = []
            for t, js in runs:
                if len(js) > 1 and js[0] not in softmax_fns:
                    x_BTE, kvs_run = run_of_layers(x_BTE, t, js, common_g, mixers_g, slopes_PH, prefix_g)
                    kv_P += kvs_run
                    continue
                for j in js:
                    layer_p = (layer_slice(common_g, j), layer_slice(mixers_g[t], within[j]), slopes_PH[j])
                    if j in softmax_fns:  # softmax layer r * P + j is number r * n_full + within[j] of the stack
                        x_BTE, sink, kv = softmax_fns[j](x_BTE, sink, layer_p, stored_g, r * n_full + within[j])
                    else:
                        x_BTE, kv = layer_fns[t](x_BTE, *layer_p, prefix_g[j])
                    kv_P.append(kv)
            return (x_BTE, sink), (kv_P if return_kv else None)

        xs = (per_repeat(common), mixers, jnp.asarray(slopes_LH.reshape(R, P, -1)), prefix_P, stored_R, jnp.arange(R))
        (x_BTE, sink), kv_RP = jax.lax.scan(body, (x_BTE, sink), xs)
        kvs = [layer_slice(kv_RP[l % P], l // P) for l in range(L)] if return_kv else None

    if stacked:
        kv_prefix.grad_sink_out = sink
    return x_BTE, kvs
