"""The KV cache: one [B, S, G, D] key and value buffer per layer, sized by num_kv_heads.

The cache is the 'cache' variable collection of `GLM` (flax linen), allocated
once per request batch with `init_cache` and threaded through `apply(...,
mutable=['cache'])`. Its bytes are exactly proportional to G (MHA: G = H, GQA-g:
G = H / g, MQA: G = 1), which is why grouped heads decode faster: each decoded
token reads the whole cache, and at long context that read is the cost.

Per cache slot it also keeps the segment id (0 = empty) and the prefix flag, so
the decoder applies GLM's attention rule with slots as positions.

Logical axes (mapped to the mesh by the same rules as training):
key/value [layers?, activation_batch, cache_length, activation_kv_heads, head_dim].
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from glm_jax.model import ModelConfig

KV_AXES = ("activation_batch", None, "activation_kv_heads", None)
SLOT_AXES = ("activation_batch", None)


def _kv_buffer(shape, dtype, axes):
    return nn.with_logical_constraint(jnp.zeros(shape, dtype), axes)


def init_cache(config: ModelConfig, batch: int, length: int, dtype=None) -> dict:
    """An empty cache for `batch` rows of up to `length` tokens (context + generated).

    Under a mesh and logical-axis rules (nn.logical_axis_rules) the buffers are
    created sharded: rows over ('data', 'fsdp'), KV heads over 'tensor' for fsdp_tp.
    dtype defaults to the model's compute dtype (bf16 on GPU/TPU).
    """
    dtype = config.compute_dtype if dtype is None else jnp.dtype(dtype)
    G, D, L = config.num_kv_heads, config.head_dim, config.num_layers
    cache = {"segment_ids": nn.with_logical_constraint(jnp.zeros((batch, length), jnp.int32), SLOT_AXES),
             "prefix_mask": nn.with_logical_constraint(jnp.zeros((batch, length), bool), SLOT_AXES)}
    if config.scan_layers:
        shape, axes = (L, batch, length, G, D), ("layers",) + KV_AXES
        cache["layers"] = {"attention": {"cached_key": _kv_buffer(shape, dtype, axes),
                                         "cached_value": _kv_buffer(shape, dtype, axes)}}
    else:
        for i in range(L):
            cache[f"layers_{i}"] = {"attention": {"cached_key": _kv_buffer((batch, length, G, D), dtype, KV_AXES),
                                                  "cached_value": _kv_buffer((batch, length, G, D), dtype, KV_AXES)}}
    return cache


def kv_bytes(cache: dict) -> int:
    """Bytes of the key and value buffers actually allocated (slot metadata excluded)."""
    total = 0
    for path, leaf in jax.tree_util.tree_flatten_with_path(cache)[0]:
        if jax.tree_util.keystr(path[-1:]) in ("['cached_key']", "['cached_value']"):
            total += leaf.size * leaf.dtype.itemsize
    return total


def kv_bytes_per_token(config: ModelConfig, dtype=None) -> int:
    """Closed form: 2 (K and V) x layers x kv_heads x head_dim x bytes per element."""
    dtype = config.compute_dtype if dtype is None else jnp.dtype(dtype)
    return 2 * config.num_layers * config.num_kv_heads * config.head_dim * dtype.itemsize
