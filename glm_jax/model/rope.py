"""Rotary position embeddings: every variant of the GLM family in one function.

- 'half' pairs dim j with j + r/2 (GPT-NeoX / GLM-130B / ChatGLM-6B halves).
- 'interleaved' pairs dims (2i, 2i+1) (ChatGLM2, GLM-4, HF `GlmForCausalLM`).
- Only the first `rotary_dim` dims of a head rotate; the rest pass through
  (partial RoPE, ChatGLM2 / GLM-4 rotate 64 of 128).
- 2D RoPE (ChatGLM-6B) rotates the first half of the rotary dims by the position
  id and the second half by the block position id.

Tables are built in float32 (the PyTorch references build them in fp16/bf16,
which is lossy at long positions), and the rotation is applied in float32.
"""

from __future__ import annotations

import jax.numpy as jnp


def inverse_frequencies(rotary_dim: int, theta: float) -> jnp.ndarray:
    """theta^(-2i / rotary_dim) for i in [0, rotary_dim / 2), float32."""
    exponents = jnp.arange(0, rotary_dim, 2, dtype=jnp.float32) / rotary_dim
    return 1.0 / (theta ** exponents)


def apply_rope(x: jnp.ndarray, positions: jnp.ndarray, rotary_dim: int,
               style: str = "half", theta: float = 10000.0) -> jnp.ndarray:
    """Rotates the first `rotary_dim` channels of x by `positions`.

    Args:
      x: [B, T, heads, D].
      positions: [B, T] integer positions.
      rotary_dim: even number of leading channels to rotate (<= D).
      style: 'half' or 'interleaved' channel pairing.
      theta: RoPE base.
    Returns:
      x rotated, same shape and dtype.
    """
    rotated, passed = x[..., :rotary_dim], x[..., rotary_dim:]
    angles = positions.astype(jnp.float32)[..., None] * inverse_frequencies(rotary_dim, theta)
    cos = jnp.cos(angles)[:, :, None, :]  # [B, T, 1, r/2], broadcast over heads
    sin = jnp.sin(angles)[:, :, None, :]
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
                  rotary_dim: int, style: str = "half", theta: float = 10000.0) -> jnp.ndarray:
    """ChatGLM-6B 2D RoPE: channels [0, r/2) rotate by position id, [r/2, r) by block id.

    Each half is an independent RoPE of dimension r/2 (inv_freq = theta^(-2i/(r/2))).
    """
    half = rotary_dim // 2
    by_position = apply_rope(x[..., :half], positions, half, style, theta)
    by_block = apply_rope(x[..., half:rotary_dim], block_positions, half, style, theta)
    return jnp.concatenate([by_position, by_block, x[..., rotary_dim:]], axis=-1)
