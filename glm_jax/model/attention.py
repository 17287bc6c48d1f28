"""Self-attention with H query heads and G key/value heads (MHA, GQA, MQA).

Projections keep the head structure in the parameter shape ([embed, heads,
head_dim]), positions are applied per the config, and the attention itself is
`glm_jax.kernels.attention`, which groups query heads per KV head.

Decoding (glm_jax.infer) passes a `CacheUpdate`. The 'cache' collection holds
two parts per layer (glm_jax/infer/cache.py): the context (written once by the
prefill) and the generated tokens (written one slot per decode step); the
queries attend over both under the same GLM rule, with slots as positions.

With config.pre_seq_len = P (P-tuning v2) each layer also holds P learned key/value
slots, `prefix_key` / `prefix_value` [P, G, D], that every query sees without
positions (glm_jax/kernels/learned_prefix.py): merged with the sequence's attention
by log-sum-exp in training and prefill, and read as one more cache part when decoding.
Prompt tuning (config.prompt_len) adds the soft prompt's keys and values of the layer to
those slots (`_attend_prompt`), computed from the prompt's states; a prefill stores them in
the cache and decode steps read them there (the prompt does not run again).
"""

from __future__ import annotations

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from glm_jax import kernels
from glm_jax.kernels import masks
from glm_jax.kernels.context_parallel import context_parallel_attention, sequence_shards
from glm_jax.kernels.learned_prefix import attention_with_learned_prefix, prefix_attention
from glm_jax.model import lambda_cache, rope
from glm_jax.model.config import ModelConfig
from glm_jax.model.layers import Dense, projection_inits


@flax.struct.dataclass
class CacheUpdate:
    """Where this call's tokens go in the KV cache and what the cache's keys are.

    index: slot of the first new token (int32 scalar); slots [0, C) are the context
      part, [C, C + N) the generated part.
    kv_segment_ids, kv_prefix_mask: [B, C + N] segment ids / prefix flags of every
      cache slot, already including the new tokens (0 = empty slot).
    prefill: the new tokens are the context (written into the context part); they
      attend only to themselves, through the training kernel (flash on GPU/TPU).
      Otherwise they are generated tokens, written into the generated part.
    written: under Λ-shaped attention (glm_jax.model.lambda_cache), each row's count of
      tokens written before this call ([B]); None otherwise.
    """

    index: jax.Array
    kv_segment_ids: jax.Array
    kv_prefix_mask: jax.Array
    prefill: bool = flax.struct.field(pytree_node=False, default=False)
    written: jax.Array | None = None


def missing_cache():
    raise ValueError("decoding needs a KV cache: apply the model with "
                     "{'params': params, 'cache': glm_jax.infer.cache.init_cache(config, batch, context, new)} "
                     "and mutable=['cache']")


def rotate(config: ModelConfig, x: jnp.ndarray, positions: jnp.ndarray) -> jnp.ndarray:
    """Applies the config's rotary embedding to q or k ([B, T, heads, D])."""
    if config.position == "rope":
        return rope.apply_rope(x, positions[:, 0], config.rotary_dim, config.rope_style, config.rope_theta,
                               config.rope_scaling_spec)
    if config.position == "rope_2d":
        return rope.apply_rope_2d(x, positions[:, 0], positions[:, 1], config.rotary_dim,
                                  config.rope_style, config.rope_theta, config.rope_scaling_spec)
    return x


class Attention(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self, x, positions, segment_ids, prefix_mask, cache: CacheUpdate | None = None, prompt=None,
                 context_windows=None):
        """The layer's attention output [B, T, E]; with a soft prompt's states [1, P, E] (prompt tuning),
        the pair (that, the prompt's own output [1, P, E]). context_windows: [B, T] parallel context
        windows of the tokens (glm_jax.kernels.attention), or None."""
        cfg = self.config
        H, G, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        inits = projection_inits(cfg)
        common = cfg.dense_options
        projections = {name: Dense((heads, D), ("embed", head_axis, "head_dim"), use_bias=cfg.qkv_bias,
                                   init=inits[name], name=name, **common)
                       for name, heads, head_axis in (("query", H, "heads"), ("key", G, "kv_heads"),
                                                      ("value", G, "kv_heads"))}
        output = Dense((cfg.hidden_size,), ("heads", "head_dim", "embed"), num_in_axes=2,
                       use_bias=cfg.out_bias, init=inits["out"], name="out", **common)

        q = rotate(cfg, projections["query"](x), positions)
        k = rotate(cfg, projections["key"](x), positions)
        v = projections["value"](x)
        q = nn.with_logical_constraint(q, ("activation_batch", "activation_length", "activation_heads", None))
        k = nn.with_logical_constraint(k, ("activation_batch", "activation_length", "activation_kv_heads", None))
        v = nn.with_logical_constraint(v, ("activation_batch", "activation_length", "activation_kv_heads", None))
        learned = self._learned_prefix() if cfg.pre_seq_len else None
        prompt_out, prompt_kv = None, None
        if prompt is not None:
            prompt_kv, prompt_out = _attend_prompt(projections, prompt, learned)
            if cache is not None:  # a prefill: decoding reads the prompt's keys and values from here
                self._cached_prompt(prompt_kv)
        elif cfg.prompt_len and cache is not None:  # a decode step: the soft prompt ran in the prefill
            prompt_kv = self._cached_prompt()
        learned = _joined(learned, prompt_kv)
        if cache is None:
            out = self._attend(q, k, v, segment_ids, prefix_mask, learned, context_windows)
        else:
            out = self._attend_with_cache(q, k, v, segment_ids, prefix_mask, cache, learned, context_windows)
        out = nn.with_logical_constraint(out, ("activation_batch", "activation_length", "activation_heads", None))
        return output(out) if prompt is None else (output(out), output(prompt_out))

    def _learned_prefix(self):
        """P-tuning v2's [P, G, D] key and value slots of this layer (a normal init: equal slots
        would stay equal under every update)."""
        cfg = self.config
        shape = (cfg.pre_seq_len, cfg.num_kv_heads, cfg.head_dim)
        init = nn.with_logical_partitioning(jax.nn.initializers.normal(cfg.init_std), (None, "kv_heads", "head_dim"))
        return (self.param("prefix_key", init, shape, cfg.weight_dtype),
                self.param("prefix_value", init, shape, cfg.weight_dtype))

    def _cached_prompt(self, prompt_kv=None):
        """Prompt tuning's keys and values of this layer [P, G, D] in the cache (stored when given)."""
        parts = [self.variable("cache", name, missing_cache) for name in PROMPT_PARTS]
        if prompt_kv is not None:
            for part, value in zip(parts, prompt_kv):
                part.value = value.astype(part.value.dtype)
        return tuple(part.value for part in parts)

    def _attend(self, q, k, v, segment_ids, prefix_mask, learned, context_windows=None):
        cfg = self.config
        options = dict(impl=cfg.attention_impl, lambda_shape=cfg.lambda_shape, context_windows=context_windows)
        if sequence_shards(jax.sharding.get_abstract_mesh()) > 1:  # tokens in context order (parallel/batch.py)
            if learned is not None:
                raise ValueError("P-tuning v2 and prompt tuning (ModelConfig.pre_seq_len, prompt_len) do not run "
                                 "with context parallelism; use MeshConfig.sequence = 1")
            if cfg.lambda_shape is not None or context_windows is not None:
                raise ValueError("Λ-shaped attention (ModelConfig.attention_window) and parallel context windows "
                                 "do not run with context parallelism; use MeshConfig.sequence = 1")
            return context_parallel_attention(q, k, v, segment_ids, prefix_mask, impl=cfg.attention_impl)
        if learned is None:
            return kernels.attention(q, k, v, segment_ids, prefix_mask, **options)
        return attention_with_learned_prefix(q, k, v, segment_ids, prefix_mask, *learned, **options)

    def _attend_with_cache(self, q, k, v, segment_ids, prefix_mask, cache: CacheUpdate, learned,
                           context_windows=None):
        """Writes k, v into their part of the cache and attends q over the cache.

        Keys are stored [B, G, D, slots] and values [B, G, slots, D]: the scores are
        [queries, D] x [D, slots] and the output [queries, slots] x [slots, D], matmuls
        that read the cache as stored (kernels.cached_attention). A learned prefix is one more
        part, first, that every query sees. Parallel context windows shape the prefill only:
        generated tokens are task tokens, which see every window.
        """
        parts = {name: self.variable("cache", name, missing_cache) for name in CACHE_PARTS}
        if cache.written is not None:
            return self._attend_with_lambda_cache(q, k, v, segment_ids, prefix_mask, cache, learned, context_windows,
                                                  parts["new_key"], parts["new_value"])
        context_length = parts["context_key"].value.shape[-1]
        if cache.prefill:
            _write(parts["context_key"], parts["context_value"], k, v, cache.index)
            return self._attend(q, k, v, segment_ids, prefix_mask, learned, context_windows)
        _write(parts["new_key"], parts["new_value"], k, v, cache.index - context_length)
        allowed = masks.cache_mask(segment_ids, cache.index, cache.kv_segment_ids, cache.kv_prefix_mask)
        keys = (parts["context_key"].value, parts["new_key"].value)
        values = (parts["context_value"].value, parts["new_value"].value)
        return _cached_attention(q, keys, values, allowed, learned)

    def _attend_with_lambda_cache(self, q, k, v, segment_ids, prefix_mask, cache: CacheUpdate, learned,
                                  context_windows, key_var, value_var):
        """Λ-shaped attention's bounded cache (glm_jax.model.lambda_cache): n sinks + a ring of w slots."""
        shape = self.config.lambda_shape
        if cache.prefill:  # the prompt attends to itself as in training; its sinks and last w tokens are kept
            sources, filled = lambda_cache.prefill_sources(jnp.sum(segment_ids > 0, axis=1), shape.sink, shape.window)
            key_var.value = lambda_cache.gather_tokens(k, sources, filled).transpose(0, 2, 3, 1).astype(
                key_var.value.dtype)
            value_var.value = lambda_cache.gather_tokens(v, sources, filled).transpose(0, 2, 1, 3).astype(
                value_var.value.dtype)
            return self._attend(q, k, v, segment_ids, prefix_mask, learned, context_windows)
        if q.shape[1] != 1:
            raise ValueError(f"Λ-shaped attention's bounded cache decodes one token per row at a time, not {q.shape[1]}")
        slot = lambda_cache.decode_slots(cache.written, shape.sink, shape.window)
        key_var.value = jnp.where(slot[:, None, None, :], k.transpose(0, 2, 3, 1).astype(key_var.value.dtype),
                                  key_var.value)
        value_var.value = jnp.where(slot[:, None, :, None], v.transpose(0, 2, 1, 3).astype(value_var.value.dtype),
                                    value_var.value)
        # Every stored token precedes the query and lies in its Λ: only written, same segment.
        allowed = cache.kv_segment_ids[:, None, :] == segment_ids[:, :, None]
        return _cached_attention(q, (key_var.value,), (value_var.value,), allowed, learned)


def _cached_attention(q, keys, values, allowed, learned):
    """kernels.cached_attention over the cache's parts, a learned prefix (P-tuning, prompt tuning) first."""
    if learned is not None:
        B, P = q.shape[0], learned[0].shape[0]
        prefix_key, prefix_value = (jnp.broadcast_to(x.astype(keys[0].dtype), (B, *x.shape)) for x in learned)
        keys = (prefix_key.transpose(0, 2, 3, 1), *keys)  # [B, G, D, P]
        values = (prefix_value.transpose(0, 2, 1, 3), *values)  # [B, G, P, D]
        allowed = jnp.concatenate([jnp.ones((*allowed.shape[:2], P), bool), allowed], axis=-1)
    return kernels.cached_attention(q, keys, values, allowed)


def _attend_prompt(projections, prompt, learned):
    """Prompt tuning inside one layer: the soft prompt's keys and values, which join the learned slots
    every query sees, and the prompt's attention over them (itself, bidirectionally, after any
    P-tuning prefix).

    The prompt has no position, so it is never rotated: what every query sees is the same as
    P-tuning v2's slots, except that these keys and values are computed from the prompt's states.
    Returns (the prompt's keys and values [P, G, D] x 2, its attention output [1, P, H, D]).
    """
    q, k, v = (projections[name](prompt) for name in ("query", "key", "value"))
    prompt_kv = (k[0], v[0])
    out, _ = prefix_attention(q, *_joined(learned, prompt_kv), scale=q.shape[-1] ** -0.5)
    return prompt_kv, out.astype(q.dtype)


def _joined(learned, prompt_kv):
    """The slots every query sees: P-tuning's, then the soft prompt's (either may be None)."""
    if learned is None or prompt_kv is None:
        return prompt_kv if learned is None else learned
    return tuple(jnp.concatenate([a.astype(b.dtype), b]) for a, b in zip(learned, prompt_kv))


# The context part is written by the prefill only, so a decode loop can hold it
# outside its loop-carried state: XLA:CPU copies every carried buffer that a step
# both reads and updates, which for a whole context cache would cost more than
# the attention itself (measured: 4 copies per buffer per token).
CACHE_PARTS = ("context_key", "context_value", "new_key", "new_value")
# Prompt tuning: the soft prompt's keys and values [P, G, D], written by the prefill (glm_jax.model.prompt_tuning).
PROMPT_PARTS = ("prompt_key", "prompt_value")


def _write(key_var, value_var, k, v, slot):
    """k, v [B, T, G, D] into a key buffer [B, G, D, S] and a value buffer [B, G, S, D] at slot."""
    key_var.value = jax.lax.dynamic_update_slice(
        key_var.value, k.transpose(0, 2, 3, 1).astype(key_var.value.dtype), (0, 0, 0, slot))
    value_var.value = jax.lax.dynamic_update_slice(
        value_var.value, v.transpose(0, 2, 1, 3).astype(value_var.value.dtype), (0, 0, slot, 0))
