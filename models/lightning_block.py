"""The MiniMax lightning-attention token mixer (transformers `MiniMaxLightningAttention`), an NNX module.

    qkv_BTH3D = silu(x @ qkv)                 # one fused projection, per head laid out [q_h | k_h | v_h]
    o_BTHD    = lightning_attention(q, k, v, slope)   # decayed linear attention, no softmax, no scale
    o_BTF     = rms_norm(o over all H*D channels, eps=config.lightning_norm_eps)
    y_BTE     = (sigmoid(x @ output_gate) * o_BTF) @ out_proj

The decay is fixed (not a parameter): head h of layer l has slope
    s_{l,h} = (2^(-8/H))^(h+1) * (1 - l / (L - 1 + 1e-5) + 1e-5)
(ALiBi geometric slopes scaled down linearly with depth; the last layer barely decays), lambda = exp(-s).
Padding tokens (segment id 0) get zero q/k/v, as transformers zeroes them with its 2-D attention mask.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from longtrain.models import attention_site
from longtrain.models.attention import ATTENTION_OUTPUT
from longtrain.models.layers import Linear, RMSNorm, module_keys, rms_norm


def lightning_slopes(num_heads: int, layer_index: int, num_layers: int) -> np.ndarray:
    """Per-head decay rates s_h [H] (fp32) of layer `layer_index` in a model of `num_layers` layers."""
    if not 0 <= layer_index < num_layers:
        raise ValueError(f"layer_index={layer_index} is outside [0, num_layers={num_layers})")
    base = 1.0 / (2.0 ** (8.0 / num_heads))
    rate = base ** (np.arange(num_heads, dtype=np.float64) + 1)
    depth_factor = 1.0 - layer_index / (num_layers - 1 + 1e-5) + 1e-5
    return (rate * depth_factor).astype(np.float32)


class Lightning(nnx.Module):
    """The lightning token mixer of one layer. Params: `qkv.kernel [E, H, 3, D]`, `output_gate.kernel [E, H, D]`,
    `norm.scale [H, D]`, `out_proj.kernel [H, D, E]` (HF Linear weights transposed, heads split out)."""

    def __init__(self, config, *, rngs: nnx.Rngs | None = None, key=None):
        E, H, D = config.hidden_size, config.num_heads, config.resolved_head_dim
        self.num_heads, self.head_dim, self.norm_eps = H, D, config.lightning_norm_eps
        k_qkv, k_gate, k_out = module_keys(rngs, key, 3)
        self.qkv = Linear((E,), (H, 3, D), ("embed",), ("heads", None, "head_dim"), config, key=k_qkv)
        self.output_gate = Linear((E,), (H, D), ("embed",), ("heads", "head_dim"), config, key=k_gate)
        self.norm = RMSNorm((H, D), ("heads", "head_dim"), config, config.lightning_norm_eps)
        self.out_proj = Linear((H, D), (E,), ("heads", "head_dim"), ("embed",), config, key=k_out)

    def __call__(self, x_BTE, *, slope_H, segment_ids, runtime, initial_state=None, return_state: bool = False):
        """Normed input x [B, T, E] -> [B, T, E] (and the fp32 state [B, H, D, D] at the last token when
        `return_state`; `initial_state` feeds the first document run, see `kernels.lightning_attention`).
        `slope_H` = `lightning_slopes(...)` of this layer (an array, so a layer scan can carry it)."""
        B, T, _ = x_BTE.shape
        H, D = self.num_heads, self.head_dim
        qkv_BTH3D = jax.nn.silu(self.qkv(x_BTE))
        if segment_ids is not None:
            qkv_BTH3D = jnp.where((segment_ids != 0)[:, :, None, None, None], qkv_BTH3D, 0)
        q_BTHD, k_BTHD, v_BTHD = qkv_BTH3D[:, :, :, 0], qkv_BTH3D[:, :, :, 1], qkv_BTH3D[:, :, :, 2]
        q_BTHD, k_BTHD, v_BTHD = (runtime.constrain(t, ("batch", "seq", "heads", "head_dim"))
                                  for t in (q_BTHD, k_BTHD, v_BTHD))
        result = attention_site.lightning_attention(runtime, q_BTHD, k_BTHD, v_BTHD, slope_H,
                                                    segment_ids=segment_ids, initial_state=initial_state,
                                                    return_state=return_state)
        o_BTHD, state = result if return_state else (result, None)
        o_BTHD = checkpoint_name(o_BTHD, ATTENTION_OUTPUT)  # kept by remat="save_attention_output", like softmax
        # RMSNorm over all heads jointly (one H*D-wide vector per token), as transformers does
        o_BTF = rms_norm(o_BTHD.reshape(B, T, H * D), self.norm.scale[...].reshape(H * D), self.norm_eps)
        gate_BTF = jax.nn.sigmoid(self.output_gate(x_BTE)).reshape(B, T, H * D)
        y_BTE = self.out_proj((gate_BTF * o_BTF).reshape(B, T, H, D))
        return (y_BTE, state) if return_state else y_BTE
