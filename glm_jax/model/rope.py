"""Rotary position embeddings: every variant of the GLM family in one function.

- 'half' pairs dim j with j + r/2 (GPT-NeoX / GLM-130B / ChatGLM-6B halves).
- 'interleaved' pairs dims (2i, 2i+1) (ChatGLM2, GLM-4, HF `GlmForCausalLM`).
- Only the first `rotary_dim` dims of a head rotate; the rest pass through
  (partial RoPE, ChatGLM2 / GLM-4 rotate 64 of 128).
- 2D RoPE (ChatGLM-6B) rotates the first half of the rotary dims by the position
  id and the second half by the block position id.

Tables are built in float32 (the PyTorch references build them in fp16/bf16,
which is lossy at long positions), and the rotation is applied in float32.

Context extension (`RopeScaling`, ModelConfig.rope_scaling*): a model trained at
context L reads s x L tokens with its frequencies changed by one of
- 'theta': base x s (ChatGLM2-32k's and GLM-4's `rope_ratio`),
- 'linear': position interpolation, every frequency / s (Chen et al. 2023, arXiv 2306.15595),
- 'ntk': NTK-aware base x s^(r / (r - 2)) (bloc97 2023; high frequencies kept, low ones
  interpolated),
- 'yarn': YaRN (Peng et al. 2023, arXiv 2309.00071): per-frequency blend of interpolation
  and extrapolation by how many turns a frequency makes within L (ramp between 1 and
  32 turns), and cos / sin scaled by 0.1 ln s + 1 (attention temperature).
Factor 1 is the identity for every method (the unscaled table, bit for bit).
"""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp

SCALING_METHODS = ("none", "theta", "linear", "ntk", "yarn")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """method (SCALING_METHODS), factor s >= 1, original_context L (YaRN: the trained context)."""

    method: str = "none"
    factor: float = 1.0
    original_context: int = 2048
    yarn_beta_fast: float = 32.0  # YaRN: frequencies turning more than this often within L extrapolate,
    yarn_beta_slow: float = 1.0   # those turning less than this interpolate (the paper's alpha, beta)


NO_SCALING = RopeScaling()


def inverse_frequencies(rotary_dim: int, theta: float) -> jnp.ndarray:
    """theta^(-2i / rotary_dim) for i in [0, rotary_dim / 2), float32."""
    exponents = jnp.arange(0, rotary_dim, 2, dtype=jnp.float32) / rotary_dim
    return 1.0 / (theta ** exponents)


def scaled_frequencies(rotary_dim: int, theta: float, scaling: RopeScaling = NO_SCALING):
    """(inverse frequencies [r/2] float32, factor on cos and sin) under `scaling`."""
    s, method = float(scaling.factor), scaling.method
    if method == "none" or s == 1.0:
        return inverse_frequencies(rotary_dim, theta), 1.0
    if method == "theta":
        return inverse_frequencies(rotary_dim, theta * s), 1.0
    if method == "linear":
        return inverse_frequencies(rotary_dim, theta) / s, 1.0
    if method == "ntk":
        return inverse_frequencies(rotary_dim, theta * s ** (rotary_dim / (rotary_dim - 2))), 1.0
    if method == "yarn":
        return _yarn(rotary_dim, theta, scaling), 0.1 * math.log(s) + 1.0
    raise ValueError(f"RoPE scaling method {method!r} is unknown; use one of {SCALING_METHODS}")


def _yarn(rotary_dim: int, theta: float, scaling: RopeScaling) -> jnp.ndarray:
    """YaRN's 'NTK-by-parts' frequencies: dimension pairs below `low` (many turns within the
    trained context) keep theirs, pairs above `high` (less than one turn) are divided by s,
    a linear ramp in between."""

    def pair_turning(turns: float) -> float:  # the (fractional) pair index that makes `turns` turns in L
        return rotary_dim * math.log(scaling.original_context / (turns * 2 * math.pi)) / (2 * math.log(theta))

    low = max(math.floor(pair_turning(scaling.yarn_beta_fast)), 0)
    high = min(math.ceil(pair_turning(scaling.yarn_beta_slow)), rotary_dim - 1)
    if low == high:
        high += 0.001  # a ramp of zero width
    ramp = jnp.clip((jnp.arange(rotary_dim // 2, dtype=jnp.float32) - low) / (high - low), 0.0, 1.0)
    extrapolated = inverse_frequencies(rotary_dim, theta)
    return extrapolated / scaling.factor * ramp + extrapolated * (1.0 - ramp)


def apply_rope(x: jnp.ndarray, positions: jnp.ndarray, rotary_dim: int,
               style: str = "half", theta: float = 10000.0, scaling: RopeScaling = NO_SCALING) -> jnp.ndarray:
    """Rotates the first `rotary_dim` channels of x by `positions`.

    Args:
      x: [B, T, heads, D].
      positions: [B, T] integer positions.
      rotary_dim: even number of leading channels to rotate (<= D).
      style: 'half' or 'interleaved' channel pairing.
      theta: RoPE base.
      scaling: context extension (RopeScaling; default none).
    Returns:
      x rotated, same shape and dtype.
    """
    rotated, passed = x[..., :rotary_dim], x[..., rotary_dim:]
    frequencies, magnitude = scaled_frequencies(rotary_dim, theta, scaling)
    angles = positions.astype(jnp.float32)[..., None] * frequencies
    cos = jnp.cos(angles)[:, :, None, :]  # [B, T, 1, r/2], broadcast over heads
    sin = jnp.sin(angles)[:, :, None, :]
    if magnitude != 1.0:
        cos, sin = cos * magnitude, sin * magnitude
    rotated = rotated.astype(jnp.float32)
    if style == "half":
        first, second = jnp.split(rotated, 2, axis=-1)
        out = jnp.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)
    elif style == "interleaved":
        even, odd = rotated[..., 0::2], rotated[..., 1::2]
        out = jnp.stack([even * cos - odd * sin, odd * cos + even * sin], axis=-1)
        out = out.reshape(rotated.shape)
    else:
        raise ValueError(f"rope style {style!r} is unknown; use 'half' or 'interleaved'")
    return jnp.concatenate([out.astype(x.dtype), passed], axis=-1)


def apply_rope_2d(x: jnp.ndarray, positions: jnp.ndarray, block_positions: jnp.ndarray,
                  rotary_dim: int, style: str = "half", theta: float = 10000.0,
                  scaling: RopeScaling = NO_SCALING) -> jnp.ndarray:
    """ChatGLM-6B 2D RoPE: channels [0, r/2) rotate by position id, [r/2, r) by block id.

    Each half is an independent RoPE of dimension r/2 (inv_freq = theta^(-2i/(r/2))).
    """
    half = rotary_dim // 2
    by_position = apply_rope(x[..., :half], positions, half, style, theta, scaling)
    by_block = apply_rope(x[..., half:rotary_dim], block_positions, half, style, theta, scaling)
    return jnp.concatenate([by_position, by_block, x[..., rotary_dim:]], axis=-1)
