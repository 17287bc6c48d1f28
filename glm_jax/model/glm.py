"""The GLM decoder: embeddings, a stack of blocks, final norm, output head.

Call contract (docs/design.md):
    GLM(config).apply({'params': params}, tokens, positions, segment_ids, prefix_mask)
    tokens [B, T] int32, positions [B, 2, T] (position ids, block position ids),
    segment_ids [B, T], prefix_mask [B, T] bool  ->  logits [B, T, vocab] float32.

Decoding adds `cache_index=` (the cache slot of the first token), `prefill=`
(the tokens are the whole context of an empty cache), `logits_at=` ([B]
positions: compute the vocabulary head for one position per row) and the
'cache' collection (glm_jax.infer.cache), applied with mutable=['cache']:
the cache's per-slot segment ids and prefix flags live here, its keys and
values in each layer's attention.

Training and evaluation pass `return_hidden=True` and get (final hidden states
[B, T, E], head kernel [E, V]) instead of logits, so the loss can apply the head
in chunks without ever holding [B, T, vocab] (glm_jax.model.chunked_loss).

Training-free context extension: ModelConfig.attention_window / attention_sink give every
attention LM-Infinite's Λ-shaped mask, and `context_windows=` ([B, T] ids: window tokens
1.., task tokens 0) runs the tokens as parallel context windows (Ratner et al. 2023; their
positions from glm_jax.kernels.masks.context_window_layout), in a forward or a prefill.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from glm_jax.model import lambda_cache
from glm_jax.model.attention import Attention, CacheUpdate, missing_cache
from glm_jax.model.config import ModelConfig
from glm_jax.model.layers import Bottleneck, Mlp, make_norm
from glm_jax.model.pipeline_parallel import pipeline_stages, run_stages
from glm_jax.model.quantization import quantize_tree
from glm_jax.model.vocab_sharding import rows_shared_pay

EMBED_ACTIVATION = ("activation_batch", "activation_length", "activation_embed")

REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class Block(nn.Module):
    """One transformer layer; `residual` picks how sublayers and norms combine.

    The carry is the hidden states [B, T, E], or under prompt tuning the pair (them, the
    soft prompt's states [1, P, E]): the prompt runs through the same layer beside the
    sequence (glm_jax.model.prompt_tuning). With config.adapter_dim each sublayer's output
    passes a bottleneck adapter before its residual sum (Houlsby et al. 2019).
    """

    config: ModelConfig

    @nn.compact
    def __call__(self, carry, positions, segment_ids, prefix_mask, cache: CacheUpdate | None = None,
                 context_windows=None):
        cfg = self.config
        streams = carry if isinstance(carry, tuple) else (carry,)
        attention = Attention(cfg, name="attention")
        mlp = Mlp(cfg, name="mlp")
        norm1, norm2 = make_norm(cfg, "input_norm"), make_norm(cfg, "post_attention_norm")
        after_attention = Bottleneck(cfg, name="attention_adapter") if cfg.adapter_dim else _identity
        after_mlp = Bottleneck(cfg, name="mlp_adapter") if cfg.adapter_dim else _identity

        def attend(hs):
            outs = attention(hs[0], positions, segment_ids, prefix_mask, cache, prompt=hs[1] if len(hs) > 1 else None,
                             context_windows=context_windows)
            return _each(after_attention, outs if isinstance(outs, tuple) else (outs,))

        def feed(hs):
            return _each(lambda h: after_mlp(mlp(h)), hs)

        if cfg.residual == "pre":
            streams = _add(streams, attend(_each(norm1, streams)))
            streams = _add(streams, feed(_each(norm2, streams)))
        elif cfg.residual == "post":
            streams = _each(norm1, _add(streams, attend(streams)))
            streams = _each(norm2, _add(streams, feed(streams)))
        elif cfg.residual == "deepnorm":
            alpha = cfg.deepnorm_alpha
            a = _each(norm1, streams)
            h = _add(_each(lambda t: alpha * t, a), attend(a))
            m = _each(norm2, h)
            streams = _add(_each(lambda t: alpha * t, m), feed(m))
        else:  # sandwich (GLM-4-0414): extra norms on each branch output
            branch_norm1 = make_norm(cfg, "post_attention_branch_norm")
            branch_norm2 = make_norm(cfg, "post_mlp_branch_norm")
            streams = _add(streams, _each(branch_norm1, attend(_each(norm1, streams))))
            streams = _add(streams, _each(branch_norm2, feed(_each(norm2, streams))))
        x = nn.with_logical_constraint(streams[0], EMBED_ACTIVATION)
        return ((x, *streams[1:]) if isinstance(carry, tuple) else x), None


def _identity(h):
    return h


def _each(fn, streams: tuple) -> tuple:
    return tuple(fn(h) for h in streams)


def _add(a: tuple, b: tuple) -> tuple:
    return tuple(x + y for x, y in zip(a, b))


def block_stack(config: ModelConfig):
    """The Block class, rematerialised and scanned as the config asks."""
    block = Block
    if config.remat_policy != "none":
        # prevent_cse only matters outside scan (scan already blocks CSE).
        block = nn.remat(Block, policy=REMAT_POLICIES[config.remat_policy],
                         prevent_cse=not config.scan_layers)
    if config.scan_layers:
        block = nn.scan(block, variable_axes={"params": 0, "cache": 0}, split_rngs={"params": True, "dropout": True},
                        in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
                        length=config.num_layers, metadata_params={nn.PARTITION_NAME: "layers"})
    return block


def _embedding_lookup(embedding, tokens):
    """Rows of the [vocab, embed] table for tokens [B, T], in the table's dtype.

    Either gather the table's 'embed' axis first (FSDP's way for any weight: the lookup
    output takes the batch sharding without a reshard, and the gradient is a whole-table
    partial sum reduced across the devices), or, where glm_jax.model.vocab_sharding says
    sharing the rows pays, keep each device's columns and look up every row of its group
    there: the gradient scatter-adds into the device's own columns and no device holds the
    whole table or a whole-table gradient.
    """
    if rows_shared_pay(*tokens.shape, embedding.shape[0], "embed"):
        tokens = nn.with_logical_constraint(tokens, ("shared_batch", "shared_length"))
        columns = nn.with_logical_constraint(embedding, ("vocab", "embed"))
        return nn.with_logical_constraint(jnp.take(columns, tokens, axis=0), ("shared_batch", "shared_length", "embed"))
    lookup_table = nn.with_logical_constraint(embedding, ("vocab", "activation_embed"))
    return jnp.take(lookup_table, tokens, axis=0)


class OutputHead(nn.Module):
    """The untied output head's [embed, vocab] kernel, at lm_head/kernel (no bias)."""

    config: ModelConfig

    @nn.compact
    def __call__(self):
        cfg = self.config
        init = nn.with_logical_partitioning(jax.nn.initializers.normal(cfg.init_std), ("embed", "vocab"))
        return self.param("kernel", init, (cfg.hidden_size, cfg.vocab_size), cfg.weight_dtype)


class GLM(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self, tokens, positions, segment_ids, prefix_mask, cache_index=None, prefill=False,
                 logits_at=None, return_hidden=False, context_windows=None):
        cfg = self.config
        dtype = cfg.compute_dtype
        embedding = self.param("embedding", nn.with_logical_partitioning(
            jax.nn.initializers.normal(cfg.init_std), ("vocab", "embed")),
            (cfg.vocab_size, cfg.hidden_size), cfg.weight_dtype)
        x = _embedding_lookup(embedding, tokens).astype(dtype)
        if cfg.embedding_grad_scale != 1.0:
            # GLM-130B shrink, alpha*x + (1-alpha)*sg(x), written so the forward value
            # is bit-identical (x - sg(x) == 0) and the gradient is exactly alpha * g.
            frozen = jax.lax.stop_gradient(x)
            x = frozen + cfg.embedding_grad_scale * (x - frozen)
        if cfg.position == "learned_2d":
            x = x + self._position_embedding("position_embedding", positions[:, 0])
            x = x + self._position_embedding("block_position_embedding", positions[:, 1])
        x = nn.with_logical_constraint(x, EMBED_ACTIVATION)

        cache = None if cache_index is None else self._update_cache(segment_ids, prefix_mask, cache_index, prefill)
        stack = block_stack(cfg)
        stages = pipeline_stages(jax.sharding.get_abstract_mesh())
        # Prompt tuning: the soft prompt's states travel through the layers beside the sequence's (a decode
        # step reads its keys and values from the cache, where the prefill stored them).
        prompt_runs = bool(cfg.prompt_len) and (cache is None or cache.prefill)
        carry = (x, self._soft_prompt()) if prompt_runs else x
        per_row = (positions, segment_ids, prefix_mask, cache, context_windows)
        if stages > 1 and cache is None and not self.is_initializing():
            carry = self._pipelined_layers(carry, positions, segment_ids, prefix_mask, stages, context_windows)
        elif cfg.scan_layers:
            carry, _ = stack(cfg, name="layers")(carry, *per_row)
        else:
            for i in range(cfg.num_layers):
                carry, _ = stack(cfg, name=f"layers_{i}")(carry, *per_row)
        x = carry[0] if prompt_runs else carry  # the prompt's own outputs predict nothing
        if cfg.residual != "post":  # post-LN blocks already end in a norm
            x = make_norm(cfg, "final_norm")(x)
        if logits_at is not None:  # [B] positions: logits of one position per row (decoding)
            x = jnp.take_along_axis(x, logits_at[:, None, None], axis=1)

        # The head as an [E, V] kernel either way (a tied embedding is used transposed).
        kernel = embedding.T if cfg.tie_embeddings else OutputHead(cfg, name="lm_head")()
        if return_hidden:  # the chunked loss applies the head itself (glm_jax.model.chunked_loss)
            return x, kernel
        logits = jnp.einsum("bte,ev->btv", x, kernel.astype(dtype))
        logits = nn.with_logical_constraint(logits, ("activation_batch", "activation_length", "activation_vocab"))
        return logits.astype(jnp.float32)

    def _pipelined_layers(self, x, positions, segment_ids, prefix_mask, stages: int, context_windows=None):
        """The layer stack as pipeline stages over the mesh's 'stage' axis (glm_jax.model.pipeline_parallel):
        the same scanned parameters, each layer applied as Block with its slice of them."""
        cfg = self.config
        if context_windows is not None:
            raise ValueError("parallel context windows (an inference option) do not run with pipeline stages "
                             "(MeshConfig.stage > 1); use MeshConfig.stage = 1")
        if cfg.prompt_len:
            raise ValueError("prompt tuning (train.adapter = 'prompt') does not run with pipeline stages "
                             "(MeshConfig.stage > 1); use MeshConfig.stage = 1")
        if not cfg.scan_layers:
            raise ValueError("pipeline stages (MeshConfig.stage > 1) split the scanned layer stack; set "
                             "ModelConfig.scan_layers = True")
        block = Block(cfg, parent=None)

        def layer(params, h, per_row):
            return block.apply({"params": params}, h, *per_row)[0]

        if cfg.remat_policy != "none":
            layer = jax.checkpoint(layer, policy=REMAT_POLICIES[cfg.remat_policy])
        layer_params = nn.unbox(self.variables["params"]["layers"])
        if any(str(path[-1].key).endswith("_lora_a") for path, _ in jax.tree_util.tree_leaves_with_path(layer_params)):
            # qwix's LoRA wraps the projections of the unstaged modules; Block.apply here would drop it.
            raise ValueError("LoRA adapters do not run with pipeline stages (MeshConfig.stage > 1); use "
                             "MeshConfig.stage = 1, or merge the adapters first (glm_jax convert merge-lora)")
        return run_stages(layer, layer_params, x, (positions, segment_ids, prefix_mask), stages,
                          cfg.pipeline_microbatches or stages)

    def _soft_prompt(self):
        """Prompt tuning's P trained input embeddings as one batch row, [1, P, E] (init like the token embeddings)."""
        cfg = self.config
        prompt = self.param("soft_prompt", nn.with_logical_partitioning(
            jax.nn.initializers.normal(cfg.init_std), (None, "embed")),
            (cfg.prompt_len, cfg.hidden_size), cfg.weight_dtype)
        return prompt[None].astype(cfg.compute_dtype)

    def _update_cache(self, segment_ids, prefix_mask, index, prefill) -> CacheUpdate:
        """Records the new tokens' segment ids and prefix flags at their cache slots."""
        kv_segment_ids = self.variable("cache", "segment_ids", missing_cache)
        kv_prefix_mask = self.variable("cache", "prefix_mask", missing_cache)
        index = jnp.asarray(index, jnp.int32)
        if self.config.lambda_shape is not None:
            return self._update_lambda_cache(segment_ids, prefix_mask, index, prefill, kv_segment_ids, kv_prefix_mask)
        kv_segment_ids.value = jax.lax.dynamic_update_slice(
            kv_segment_ids.value, segment_ids.astype(kv_segment_ids.value.dtype), (0, index))
        kv_prefix_mask.value = jax.lax.dynamic_update_slice(
            kv_prefix_mask.value, prefix_mask.astype(kv_prefix_mask.value.dtype), (0, index))
        return CacheUpdate(index=index, kv_segment_ids=kv_segment_ids.value,
                           kv_prefix_mask=kv_prefix_mask.value, prefill=prefill)

    def _update_lambda_cache(self, segment_ids, prefix_mask, index, prefill, kv_segment_ids, kv_prefix_mask):
        """The same for Λ-shaped attention's bounded cache (glm_jax.model.lambda_cache), which counts each
        row's written tokens instead of using the slot index."""
        shape = self.config.lambda_shape
        written = self.variable("cache", "written", missing_cache)
        if prefill:
            lengths = jnp.sum(segment_ids > 0, axis=1).astype(jnp.int32)
            sources, filled = lambda_cache.prefill_sources(lengths, shape.sink, shape.window)
            kv_segment_ids.value = lambda_cache.gather_tokens(segment_ids.astype(jnp.int32), sources, filled)
            kv_prefix_mask.value = lambda_cache.gather_tokens(prefix_mask.astype(bool), sources, filled, False)
            before, written.value = jnp.zeros_like(lengths), lengths
        else:
            before = written.value
            slot = lambda_cache.decode_slots(before, shape.sink, shape.window)
            kv_segment_ids.value = jnp.where(slot, segment_ids[:, :1].astype(jnp.int32), kv_segment_ids.value)
            kv_prefix_mask.value = jnp.where(slot, prefix_mask[:, :1].astype(bool), kv_prefix_mask.value)
            written.value = before + 1
        return CacheUpdate(index=index, kv_segment_ids=kv_segment_ids.value, kv_prefix_mask=kv_prefix_mask.value,
                           prefill=prefill, written=before)

    def _position_embedding(self, name, ids):
        cfg = self.config
        table = self.param(name, nn.with_logical_partitioning(
            jax.nn.initializers.normal(cfg.init_std), (None, "embed")),
            (cfg.max_position, cfg.hidden_size), cfg.weight_dtype)
        table = nn.with_logical_constraint(table, (None, "activation_embed"))
        return jnp.take(table, ids, axis=0).astype(cfg.compute_dtype)


def example_inputs(batch: int = 1, length: int = 8):
    """Causal single-segment inputs of the right shapes and dtypes (for init and tests)."""
    tokens = jnp.zeros((batch, length), jnp.int32)
    positions = jnp.broadcast_to(jnp.stack([jnp.arange(length), jnp.zeros(length, jnp.int32)]),
                                 (batch, 2, length)).astype(jnp.int32)
    segment_ids = jnp.ones((batch, length), jnp.int32)
    prefix_mask = jnp.zeros((batch, length), bool)
    return tokens, positions, segment_ids, prefix_mask


def init_params(config: ModelConfig, rng: jax.Array):
    """Boxed (logically partitioned) parameters of GLM(config)."""
    return GLM(config).init(rng, *example_inputs())["params"]


def abstract_params(config: ModelConfig):
    """Shapes and dtypes of every parameter, nothing allocated (jax.eval_shape)."""
    return jax.eval_shape(lambda rng: init_params(config, rng), jax.random.key(0))


def quantize_params(params, config: ModelConfig):
    """Float parameters of the unquantized model -> those of GLM(config), whose config.quant_bits is set
    (glm_jax.model.quantization: the attention and MLP projections; everything else as it is)."""
    return quantize_tree(params, nn.unbox(abstract_params(config)), config.quant_bits, config.quant_group_size)


def param_bytes(params) -> int:
    """Bytes of a parameter tree (arrays or abstract shapes)."""
    return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params)))
