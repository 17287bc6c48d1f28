"""Self-attention with H query heads and G key/value heads (MHA, GQA, MQA).

Projections keep the head structure in the parameter shape ([embed, heads,
head_dim]), positions are applied per the config, and the attention itself is
`glm_jax.kernels.attention`, which groups query heads per KV head.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from glm_jax import kernels
from glm_jax.model import rope
from glm_jax.model.config import ModelConfig
from glm_jax.model.layers import Dense, projection_inits


def rotate(config: ModelConfig, x: jnp.ndarray, positions: jnp.ndarray) -> jnp.ndarray:
    """Applies the config's rotary embedding to q or k ([B, T, heads, D])."""
    if config.position == "rope":
        return rope.apply_rope(x, positions[:, 0], config.rotary_dim, config.rope_style, config.rope_theta)
    if config.position == "rope_2d":
        return rope.apply_rope_2d(x, positions[:, 0], positions[:, 1], config.rotary_dim,
                                  config.rope_style, config.rope_theta)
    return x


class Attention(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self, x, positions, segment_ids, prefix_mask):
        cfg = self.config
        H, G, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        inits = projection_inits(cfg)
        common = dict(dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype)

        def project(name, heads, head_axis):
            return Dense((heads, D), ("embed", head_axis, "head_dim"), use_bias=cfg.qkv_bias,
                         init=inits[name], name=name, **common)(x)

        q = rotate(cfg, project("query", H, "heads"), positions)
        k = rotate(cfg, project("key", G, "kv_heads"), positions)
        v = project("value", G, "kv_heads")
        q = nn.with_logical_constraint(q, ("activation_batch", "activation_length", "activation_heads", None))
        k = nn.with_logical_constraint(k, ("activation_batch", "activation_length", "activation_kv_heads", None))
        v = nn.with_logical_constraint(v, ("activation_batch", "activation_length", "activation_kv_heads", None))
        out = kernels.attention(q, k, v, segment_ids, prefix_mask, impl=cfg.attention_impl)
        out = nn.with_logical_constraint(out, ("activation_batch", "activation_length", "activation_heads", None))
        return Dense((cfg.hidden_size,), ("heads", "head_dim", "embed"), num_in_axes=2,
                     use_bias=cfg.out_bias, init=inits["out"], name="out", **common)(out)
