"""Weight-only INT8 / INT4 quantization of the projection kernels (GLM-130B's scheme).

A quantized projection stores, instead of `kernel` [*in, *out]:

    qkernel [*out, in]          int8 (8 bits), or uint8 holding two 4-bit values per byte (4 bits)
    scale   [*out, in / group]  float32: one absmax scale per output channel (group None), or per
                                `group` consecutive inputs of each output channel (group-wise)

with the input axes flattened (`in` = their product) and w = q * scale. The scale is absmax /
(2^(bits-1) - 1) and q = round(w / scale), so q is in [-127, 127] or [-7, 7], as GLM-130B's
`quantize(weight, bits)` computes it (per output row of torch's [out, in] weight).

INT4 packing: byte j of a row holds inputs 2j (low nibble) and 2j + 1 (high nibble), two's
complement: the layout `jax.lax.bitcast_convert_type(uint8 -> int4)` reads, so an accelerator
can reinterpret it for free. Unpacking uses shifts, which XLA:CPU runs faster than an int4 convert.

The kernel is stored output-major ([*out, in], torch's layout) because the matmul is written
x @ dequantize(...).T: at batch 1 (one decoded token) XLA:CPU fuses the int8 -> float convert,
the scale and the transpose into its matrix-vector loop and reads 1 byte per weight instead of
4 (experiments/benchmarks/decode.py measures it); GPU and TPU fuse the dequantization into the
matmul's operand either way. qwix (Google's JAX quantization library) has the same absmax math,
but its weight-only matmul dequantizes the [*in, *out] kernel into a full float copy before the
dot on CPU (measured 17x slower than float at batch 1), and uses the qmax + 0.5 bound rather than
GLM-130B's qmax; this module is the few lines that differ.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

BITS = (4, 8)


def qmax(bits: int) -> int:
    return 2 ** (bits - 1) - 1


def check_scheme(bits: int, group_size: int | None, in_features: int | None = None, where: str = "") -> None:
    """ValueError (what is wrong and what to choose) for an impossible scheme."""
    if bits not in BITS:
        raise ValueError(f"quantization bits {bits!r} is not supported; choose 8 (INT8) or 4 (INT4)")
    if group_size is not None and (not isinstance(group_size, int) or group_size < 1):
        raise ValueError(f"quantization group size {group_size!r} must be a positive whole number "
                         "(or None: one scale per output channel)")
    if in_features is None:
        return
    if group_size is not None and in_features % group_size:
        raise ValueError(f"quantization group size {group_size} does not divide the input dimension "
                         f"{in_features}{where}; choose a divisor of it (e.g. 64 or 128) or no group size "
                         "(one scale per output channel)")
    if bits == 4 and (in_features % 2 or (group_size is not None and group_size % 2)):
        raise ValueError(f"INT4 packs two inputs per byte, so the input dimension ({in_features}{where}) "
                         f"and the group size ({group_size}) must be even")


def stored_inputs(bits: int, in_features: int) -> int:
    """Length of qkernel's last axis: one byte per input (INT8) or per two inputs (INT4)."""
    return in_features // 2 if bits == 4 else in_features


def quantize_kernel(kernel: jax.Array, num_in_axes: int, bits: int, group_size: int | None):
    """kernel [*in, *out] (float) -> (qkernel [*out, in_stored], scale [*out, groups] float32)."""
    in_shape = kernel.shape[:num_in_axes]
    in_features = math.prod(in_shape)
    check_scheme(bits, group_size, in_features)
    out_shape = kernel.shape[num_in_axes:]
    w = kernel.astype(jnp.float32).reshape(in_features, -1).T.reshape(*out_shape, in_features)
    group = group_size or in_features
    grouped = w.reshape(*out_shape, in_features // group, group)
    scale = jnp.max(jnp.abs(grouped), axis=-1) / qmax(bits)
    # An all-zero group keeps scale 0 (it dequantizes to zeros); divide by 1 there instead.
    q = jnp.round(grouped / jnp.where(scale == 0, 1.0, scale)[..., None])
    q = jnp.clip(q, -qmax(bits), qmax(bits)).astype(jnp.int8).reshape(*out_shape, in_features)
    return (pack_int4(q) if bits == 4 else q), scale


def dequantize(qkernel: jax.Array, scale: jax.Array, bits: int, dtype=jnp.float32) -> jax.Array:
    """(qkernel, scale) -> the weights [*out, in] in `dtype` (q * scale per group)."""
    q = unpack_int4(qkernel) if bits == 4 else qkernel
    *out_shape, in_features = q.shape
    groups = scale.shape[-1]
    w = q.astype(jnp.float32).reshape(*out_shape, groups, in_features // groups) * scale[..., None]
    return w.reshape(*out_shape, in_features).astype(dtype)


def pack_int4(q: jax.Array) -> jax.Array:
    """int8 values in [-8, 7], last axis even -> uint8 with inputs 2j, 2j+1 in byte j's low, high nibble."""
    low, high = q[..., 0::2], q[..., 1::2]
    return ((low & 0xF) | ((high & 0xF) << 4)).astype(jnp.uint8)


def unpack_int4(packed: jax.Array) -> jax.Array:
    """pack_int4's inverse: uint8 [..., n] -> int8 [..., 2n] (sign-extended nibbles)."""
    low = jnp.left_shift(packed, 4).astype(jnp.int8) >> 4  # arithmetic shift sign-extends
    high = packed.astype(jnp.int8) >> 4
    return jnp.stack([low, high], axis=-1).reshape(*packed.shape[:-1], 2 * packed.shape[-1])


def quantized_matmul(x: jax.Array, qkernel: jax.Array, scale: jax.Array, bits: int, num_in_axes: int,
                     dtype) -> jax.Array:
    """x [..., *in] @ W, W the dequantized kernel: [..., *out] in `dtype`."""
    in_shape = x.shape[x.ndim - num_in_axes:]
    in_features = math.prod(in_shape)
    out_shape = qkernel.shape[:-1]
    w = dequantize(qkernel, scale, bits, dtype).reshape(-1, in_features)
    # Written with .T (not dot_general over axis 1): XLA:CPU then fuses the convert into its
    # matrix-vector loop at batch 1; see the module docstring.
    y = x.reshape(-1, in_features).astype(dtype) @ w.T
    return y.reshape(*x.shape[:x.ndim - num_in_axes], *out_shape)



def quantize_tree(params: dict, abstract_quantized: dict, bits: int, group_size: int | None) -> dict:
    """Float GLM parameters -> the parameters of the same model with quant_bits / quant_group_size
    (glm_jax.model.quantize_params derives the arguments from a ModelConfig).

    `abstract_quantized` (the quantized model's abstract parameters) says which projections are
    quantized (those with a `qkernel`); everything else is returned as it is. Kernels of a scanned
    layer stack ('layers', a leading layer axis) are quantized layer by layer.
    """

    def convert(tree: dict, target: dict, stacked: bool) -> dict:
        if "qkernel" in target:
            kernel = tree["kernel"]
            n_out = target["qkernel"].ndim - 1 - stacked
            n_in = kernel.ndim - stacked - n_out
            quantize = functools.partial(quantize_kernel, num_in_axes=n_in, bits=bits, group_size=group_size)
            qkernel, scale = (jax.vmap(quantize) if stacked else quantize)(kernel)
            return {**{k: v for k, v in tree.items() if k != "kernel"}, "qkernel": qkernel, "scale": scale}
        return {k: convert(v, target[k], stacked) if isinstance(v, dict) else v for k, v in tree.items()}

    return {k: convert(v, abstract_quantized[k], stacked=k == "layers") if isinstance(v, dict) else v
            for k, v in params.items()}
