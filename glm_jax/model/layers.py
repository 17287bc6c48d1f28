"""Building blocks: a logically-partitioned Dense, norms, the MLP variants, init rules.

Every parameter is created with `nn.with_logical_partitioning`, so sharding is a
rules table (glm_jax/parallel/rules.py), never a property of the module code.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from glm_jax.model import quantization
from glm_jax.model.config import ModelConfig

# An init factory receives the kernel's input and output axes (fans for Xavier).
InitFactory = Callable[[tuple[int, ...], tuple[int, ...]], jax.nn.initializers.Initializer]


def normal_init(std: float) -> InitFactory:
    """N(0, std) regardless of fans (GLM: std 0.02)."""
    return lambda in_axis, out_axis: jax.nn.initializers.normal(std)


def xavier_init(gain: float) -> InitFactory:
    """Xavier-normal with `gain`: std = gain * sqrt(2 / (fan_in + fan_out)) (DeepNorm)."""
    return lambda in_axis, out_axis: jax.nn.initializers.variance_scaling(
        gain ** 2, "fan_avg", "normal", in_axis=in_axis, out_axis=out_axis)


def projection_inits(config: ModelConfig) -> dict[str, InitFactory]:
    """Initialiser of each projection, following each reference.

    GLM / ChatGLM: N(0, 0.02), output projections N(0, 0.02 / sqrt(2L)).
    DeepNorm (GLM-130B): Xavier-normal, gain beta = (2L)^-0.5 on value, attention
    output and both MLP projections, gain 1 on query and key.
    """
    if config.residual == "deepnorm":
        beta = config.deepnorm_beta
        return {"query": xavier_init(1.0), "key": xavier_init(1.0), "value": xavier_init(beta),
                "out": xavier_init(beta), "mlp_in": xavier_init(beta), "mlp_out": xavier_init(beta)}
    std, scaled = config.init_std, config.init_std / math.sqrt(2.0 * config.num_layers)
    return {"query": normal_init(std), "key": normal_init(std), "value": normal_init(std),
            "out": normal_init(scaled), "mlp_in": normal_init(std), "mlp_out": normal_init(scaled)}


class Dense(nn.Module):
    """x[..., *in] @ kernel[*in, *features] (+ bias[*features]), with logical axis names.

    `axes` names every kernel dimension (input axes first); the bias is named by
    the feature part. Contracting several input axes (e.g. heads x head_dim of
    the attention output) keeps the head structure visible to the sharding rules.

    quant_bits 8 | 4: a weight-only quantized projection for inference, `qkernel` and
    `scale` instead of `kernel` (glm_jax.model.quantization), dequantized inside the matmul.
    """

    features: Sequence[int]
    axes: Sequence[str | None]
    num_in_axes: int = 1
    use_bias: bool = False
    init: InitFactory = normal_init(0.02)
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    quant_bits: int | None = None
    quant_group_size: int | None = None

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        features = tuple(self.features)
        n_in = self.num_in_axes
        if self.quant_bits:
            y = self._quantized(x, features)
        else:
            in_shape = x.shape[-n_in:]
            in_axis = tuple(range(n_in))
            out_axis = tuple(range(n_in, n_in + len(features)))
            kernel = self.param(
                "kernel",
                nn.with_logical_partitioning(self.init(in_axis, out_axis), tuple(self.axes)),
                in_shape + features, self.param_dtype)
            contract = (tuple(range(x.ndim - n_in, x.ndim)), in_axis)
            y = jax.lax.dot_general(x.astype(self.dtype), kernel.astype(self.dtype), (contract, ((), ())))
        if self.use_bias:
            bias = self.param("bias", nn.with_logical_partitioning(
                jax.nn.initializers.zeros, tuple(self.axes[n_in:])), features, self.param_dtype)
            y = y + bias.astype(self.dtype)
        return y

    def _quantized(self, x: jnp.ndarray, features: tuple[int, ...]) -> jnp.ndarray:
        """x @ W with W stored quantized, output-major: qkernel [*out, in], scale [*out, groups]."""
        n_in, bits, group = self.num_in_axes, self.quant_bits, self.quant_group_size
        in_features = math.prod(x.shape[-n_in:])
        quantization.check_scheme(bits, group, in_features, f" of {self.name}")
        groups = in_features // (group or in_features)
        # The flattened input axis is named by its major (first) input axis, which shards it the
        # same way; per-channel scales have one group, which no mesh axis divides.
        out_names, in_name = tuple(self.axes[n_in:]), self.axes[0]
        stored = features + (quantization.stored_inputs(bits, in_features),)
        qkernel = self.param("qkernel", nn.with_logical_partitioning(jax.nn.initializers.zeros, out_names + (in_name,)),
                             stored, jnp.int8 if bits == 8 else jnp.uint8)
        scale = self.param("scale", nn.with_logical_partitioning(
            jax.nn.initializers.ones, out_names + (in_name if group else None,)), features + (groups,), jnp.float32)
        return quantization.quantized_matmul(x, qkernel, scale, bits, n_in, self.dtype)


class Norm(nn.Module):
    """LayerNorm or RMSNorm over the last axis, statistics in float32."""

    kind: str
    eps: float
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        features = x.shape[-1]
        scale = self.param("scale", nn.with_logical_partitioning(
            jax.nn.initializers.ones, ("embed",)), (features,), self.param_dtype)
        x32 = x.astype(jnp.float32)
        if self.kind == "rmsnorm":
            y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
            return y.astype(self.dtype) * scale.astype(self.dtype)
        bias = self.param("bias", nn.with_logical_partitioning(
            jax.nn.initializers.zeros, ("embed",)), (features,), self.param_dtype)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(self.dtype)


def make_norm(config: ModelConfig, name: str) -> Norm:
    return Norm(config.norm, config.norm_eps, config.compute_dtype, config.weight_dtype, name=name)


# Which half of a gated up-projection is the gate, as in each reference:
# GLM-130B GeGLU `x1 * gelu(x2)` gates the SECOND half; ChatGLM2 / GLM-4 SwiGLU
# `silu(x1) * x2` gates the FIRST.
GATE_HALF = {"geglu": 1, "swiglu": 0}
GATE_FN = {"geglu": lambda x: jax.nn.gelu(x, approximate=False), "swiglu": jax.nn.silu}


class Mlp(nn.Module):
    """gelu: wo(gelu_tanh(wi x)); geglu / swiglu: wo(act(gate) * up) from a fused wi.

    The gated up projection is stored as [embed, 2, mlp]: index 0 is the first
    half of the reference's fused [embed, 2 * mlp] kernel and index 1 the second,
    so checkpoint conversion is a reshape and 'mlp' shards cleanly over tensor.
    """

    config: ModelConfig

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        cfg = self.config
        inits = projection_inits(cfg)
        common = dict(use_bias=cfg.mlp_bias, **cfg.dense_options)
        if cfg.gated_mlp:
            h = Dense((2, cfg.mlp_dim), ("embed", None, "mlp"), init=inits["mlp_in"],
                      name="wi", **common)(x)
            gate_index = GATE_HALF[cfg.mlp_activation]
            gate, up = h[..., gate_index, :], h[..., 1 - gate_index, :]
            h = GATE_FN[cfg.mlp_activation](gate) * up
        else:
            h = Dense((cfg.mlp_dim,), ("embed", "mlp"), init=inits["mlp_in"], name="wi", **common)(x)
            h = jax.nn.gelu(h, approximate=True)
        h = nn.with_logical_constraint(h, ("activation_batch", "activation_length", "activation_mlp"))
        return Dense((cfg.hidden_size,), ("mlp", "embed"), init=inits["mlp_out"], name="wo", **common)(h)


class Bottleneck(nn.Module):
    """A bottleneck adapter (Houlsby et al. 2019): h + up(gelu(down(h))), E -> config.adapter_dim -> E.

    Sits on a sublayer's output before the residual sum (glm_jax.model.glm.Block). The
    up-projection starts at zero, so a fresh adapter is the identity and the adapted model
    starts as its base. Parameters are named `adapter_*` (glm_jax.model.adapters tells
    adapter parameters apart by name); the bottleneck width is replicated, the model width
    sharded like the model's.
    """

    config: ModelConfig

    @nn.compact
    def __call__(self, h: jnp.ndarray) -> jnp.ndarray:
        cfg = self.config
        E, A = cfg.hidden_size, cfg.adapter_dim

        def param(name, init, axes, shape):
            return self.param(name, nn.with_logical_partitioning(init, axes), shape, cfg.weight_dtype).astype(h.dtype)

        down = param("adapter_down", jax.nn.initializers.lecun_normal(), ("embed", None), (E, A))
        down_bias = param("adapter_down_bias", jax.nn.initializers.zeros, (None,), (A,))
        up = param("adapter_up", jax.nn.initializers.zeros, (None, "embed"), (A, E))
        up_bias = param("adapter_up_bias", jax.nn.initializers.zeros, ("embed",), (E,))
        return h + jax.nn.gelu(h @ down + down_bias, approximate=True) @ up + up_bias
