"""The KV cache: per layer a context part and a generated part, sized by num_kv_heads.

The cache is the 'cache' variable collection of `GLM` (flax linen), allocated
once per request batch with `init_cache` and threaded through `apply(...,
mutable=['cache'])`. Slots [0, C) hold the context (written once, by the
prefill) and slots [C, C + N) the generated tokens (one per decode step). The
two parts are separate buffers so the decode loop carries only the small
generated part and holds the context outside its loop state (XLA:CPU copies
every loop-carried buffer that a step both reads and updates). Keys are
[B, G, D, slots] and values [B, G, slots, D]: heads first, and each decode
matmul reads the cache as stored, slots as its long axis (kernels.cached_attention).

Its bytes are exactly proportional to G (MHA: G = H, GQA-g: G = H / g, MQA:
G = 1), which is why grouped heads decode faster: each decoded token reads the
whole cache, and at long context that read is the cost. Per slot it also keeps
the segment id (0 = empty) and the prefix flag, so the decoder applies GLM's
attention rule with slots as positions.

Logical axes (mapped to the mesh by the same rules as training): rows over
'activation_batch', KV heads over 'activation_kv_heads'.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp
from flax import traverse_util

from glm_jax.model import ModelConfig

KV_AXES = ("activation_batch", "activation_kv_heads", None, None)
SLOT_AXES = ("activation_batch", None)
SLOT_AXIS = {"context_key": -1, "new_key": -1, "context_value": -2, "new_value": -2}
CONTEXT_PARTS = ("context_key", "context_value", "prompt_key", "prompt_value")  # written by the prefill only


def _kv_buffer(shape, dtype, axes):
    return nn.with_logical_constraint(jnp.zeros(shape, dtype), axes)


def _layer_buffers(G: int, D: int, batch: int, context: int, new: int, dtype, leading=(), prompt: int = 0) -> dict:
    axes = ("layers",) * len(leading) + KV_AXES
    shapes = {"context_key": (batch, G, D, context), "context_value": (batch, G, context, D),
              "new_key": (batch, G, D, new), "new_value": (batch, G, new, D)}
    buffers = {name: _kv_buffer((*leading, *shape), dtype, axes) for name, shape in shapes.items()}
    if prompt:  # prompt tuning's keys and values, the same for every row (glm_jax.model.prompt_tuning)
        prompt_axes = ("layers",) * len(leading) + (None, "activation_kv_heads", None)
        buffers.update({name: _kv_buffer((*leading, prompt, G, D), dtype, prompt_axes)
                        for name in ("prompt_key", "prompt_value")})
    return buffers


def init_cache(config: ModelConfig, batch: int, context: int, new: int, dtype=None) -> dict:
    """An empty cache for `batch` rows of `context` prompt slots and `new` generated slots
    (under Λ-shaped attention: attention_sink + attention_window slots, whatever both are).

    Under a mesh and logical-axis rules (nn.logical_axis_rules) the buffers are
    created sharded: rows over ('data', 'fsdp'), KV heads over 'tensor' for fsdp_tp.
    dtype defaults to the model's compute dtype (bf16 on GPU/TPU).
    """
    dtype = config.compute_dtype if dtype is None else jnp.dtype(dtype)
    G, D, L = config.num_kv_heads, config.head_dim, config.num_layers
    cache = {}
    if config.lambda_shape is not None:  # n sinks + a ring of w slots, whatever the lengths (model/lambda_cache.py)
        context, new = 0, config.attention_sink + config.attention_window
        cache["written"] = nn.with_logical_constraint(jnp.zeros((batch,), jnp.int32), SLOT_AXES[:1])
    slots = context + new
    cache.update(segment_ids=nn.with_logical_constraint(jnp.zeros((batch, slots), jnp.int32), SLOT_AXES),
                 prefix_mask=nn.with_logical_constraint(jnp.zeros((batch, slots), bool), SLOT_AXES))
    if config.scan_layers:
        cache["layers"] = {"attention": _layer_buffers(G, D, batch, context, new, dtype, leading=(L,),
                                                       prompt=config.prompt_len)}
    else:
        for i in range(L):
            cache[f"layers_{i}"] = {"attention": _layer_buffers(G, D, batch, context, new, dtype,
                                                                prompt=config.prompt_len)}
    return cache


def split_context(cache: dict) -> tuple[dict, dict]:
    """(context buffers, everything else): the loop-invariant and the loop-carried parts."""
    flat = traverse_util.flatten_dict(cache)
    context = {k: v for k, v in flat.items() if k[-1] in CONTEXT_PARTS}
    rest = {k: v for k, v in flat.items() if k[-1] not in CONTEXT_PARTS}
    return traverse_util.unflatten_dict(context), traverse_util.unflatten_dict(rest)


def merge_context(context: dict, rest: dict) -> dict:
    """Inverse of split_context."""
    return traverse_util.unflatten_dict({**traverse_util.flatten_dict(context), **traverse_util.flatten_dict(rest)})


def kv_bytes(cache: dict) -> int:
    """Bytes of the key and value buffers actually allocated (slot metadata excluded)."""
    return sum(leaf.size * leaf.dtype.itemsize for path, leaf in traverse_util.flatten_dict(cache).items()
               if path[-1] in SLOT_AXIS)


def kv_bytes_per_token(config: ModelConfig, dtype=None) -> int:
    """Closed form: 2 (K and V) x layers x kv_heads x head_dim x bytes per element."""
    dtype = config.compute_dtype if dtype is None else jnp.dtype(dtype)
    return 2 * config.num_layers * config.num_kv_heads * config.head_dim * dtype.itemsize
