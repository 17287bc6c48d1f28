"""Self-attention with H query heads and G key/value heads (MHA, GQA, MQA).

Projections keep the head structure in the parameter shape ([embed, heads,
head_dim]), positions are applied per the config, and the attention itself is
`glm_jax.kernels.attention`, which groups query heads per KV head.

Decoding (glm_jax.infer) passes a `CacheUpdate`: the new keys and values are
written into the 'cache' collection (`cached_key`, `cached_value`: [B, S, G, D], so the cache
is exactly proportional to G) at slot `index`, and the queries attend over the
whole cache under the same GLM rule, with slots as positions.
"""

from __future__ import annotations

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from glm_jax import kernels
from glm_jax.kernels import masks
from glm_jax.model import rope
from glm_jax.model.config import ModelConfig
from glm_jax.model.layers import Dense, projection_inits


@flax.struct.dataclass
class CacheUpdate:
    """Where this call's tokens go in the KV cache and what the cache's keys are.

    index: slot of the first new token (int32 scalar).
    kv_segment_ids, kv_prefix_mask: [B, S] segment ids / prefix flags of every cache
      slot, already including the new tokens (0 = empty slot).
    prefill: the cache is empty and the new tokens are the whole context, so they
      attend only to themselves through the training kernel (flash on GPU/TPU).
    """

    index: jax.Array
    kv_segment_ids: jax.Array
    kv_prefix_mask: jax.Array
    prefill: bool = flax.struct.field(pytree_node=False, default=False)


def missing_cache():
    raise ValueError("decoding needs a KV cache: apply the model with "
                     "{'params': params, 'cache': glm_jax.infer.cache.init_cache(config, batch, length)} "
                     "and mutable=['cache']")


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
    def __call__(self, x, positions, segment_ids, prefix_mask, cache: CacheUpdate | None = None):
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
        if cache is None:
            out = kernels.attention(q, k, v, segment_ids, prefix_mask, impl=cfg.attention_impl)
        else:
            out = self._attend_with_cache(q, k, v, segment_ids, prefix_mask, cache)
        out = nn.with_logical_constraint(out, ("activation_batch", "activation_length", "activation_heads", None))
        return Dense((cfg.hidden_size,), ("heads", "head_dim", "embed"), num_in_axes=2,
                     use_bias=cfg.out_bias, init=inits["out"], name="out", **common)(out)

    def _attend_with_cache(self, q, k, v, segment_ids, prefix_mask, cache: CacheUpdate):
        """Writes k, v at cache.index and attends q over the cache (or, in prefill, over k, v)."""
        cached_key = self.variable("cache", "cached_key", missing_cache)
        cached_value = self.variable("cache", "cached_value", missing_cache)
        slot = (0, cache.index, 0, 0)
        cached_key.value = jax.lax.dynamic_update_slice(cached_key.value, k.astype(cached_key.value.dtype), slot)
        cached_value.value = jax.lax.dynamic_update_slice(cached_value.value, v.astype(cached_value.value.dtype), slot)
        if cache.prefill:
            return kernels.attention(q, k, v, segment_ids, prefix_mask, impl=self.config.attention_impl)
        allowed = masks.cache_mask(segment_ids, cache.index, cache.kv_segment_ids, cache.kv_prefix_mask)
        keys, values = cached_key.value.astype(q.dtype), cached_value.value.astype(q.dtype)
        return kernels.masked_attention(q, keys, values, allowed, scale=q.shape[-1] ** -0.5)
