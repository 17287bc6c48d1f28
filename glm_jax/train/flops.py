"""Analytic model FLOPs (for MFU), counted the way MaxText and Levanter count them.

Training FLOPs of one step = 3 x forward (backward is two matmuls per forward one):
- weights: 6 * N_matmul per token, where N_matmul counts every matmul weight
  (attention and MLP projections of every layer, plus the output head; embedding
  lookups, norms and biases do no matmuls);
- attention: QK^T and PV cost 2 * 2 * D multiply-adds per (query head, attended
  pair) forward, so 12 * L * Hq * D per pair for training.
GLM's mask hides part of the score matrix, so the honest count follows the mask
(attended pairs = number of allowed (q, k) pairs). MaxText and Levanter count the
full T x T matrix (or half of it for causal); `full_matrix` gives that variant so
figures compare across frameworks.
"""

from __future__ import annotations

import numpy as np

from glm_jax.model.config import ModelConfig


def matmul_params(config: ModelConfig) -> int:
    """Weights that take part in a matmul per token (no biases, norms or lookups)."""
    E, H, G, D, F = (config.hidden_size, config.num_heads, config.num_kv_heads,
                     config.head_dim, config.mlp_dim)
    attention = E * (H + 2 * G) * D + H * D * E
    mlp = E * F * (2 if config.gated_mlp else 1) + F * E
    return config.num_layers * (attention + mlp) + config.vocab_size * E


def attended_pairs(segment_ids: np.ndarray, prefix_mask: np.ndarray) -> int:
    """Allowed (query, key) pairs of a batch under the GLM rule, in closed form per segment.

    A segment of length n with prefix p has p*p prefix-prefix pairs plus, for each
    of its n - p causal queries at offset i >= p, i + 1 keys.
    """
    total = 0
    for seg_row, prefix_row in zip(np.asarray(segment_ids), np.asarray(prefix_mask)):
        boundaries = np.flatnonzero(np.diff(seg_row)) + 1
        for start, end in zip(np.r_[0, boundaries], np.r_[boundaries, len(seg_row)]):
            n, p = int(end - start), int(prefix_row[start:end].sum())
            total += p * p + sum(i + 1 for i in range(p, n))
    return total


def training_flops(config: ModelConfig, tokens: int, pairs: int) -> float:
    """FLOPs of one forward+backward over `tokens` tokens with `pairs` attended pairs."""
    weights = 6.0 * matmul_params(config) * tokens
    attention = 12.0 * config.num_layers * config.num_heads * config.head_dim * pairs
    return weights + attention


def training_flops_both(config: ModelConfig, segment_ids: np.ndarray, prefix_mask: np.ndarray) -> dict:
    """{'attended': mask-following count, 'full_matrix': T x T per row} for one batch."""
    batch, length = np.shape(segment_ids)
    tokens = batch * length
    return {"attended": training_flops(config, tokens, attended_pairs(segment_ids, prefix_mask)),
            "full_matrix": training_flops(config, tokens, batch * length * length)}


# Dense bf16 peak FLOP/s per chip (vendor figures) for MFU on accelerators.
PEAK_FLOPS = {
    "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v5": 459e12,
    "TPU v6 lite": 918e12, "TPU v6e": 918e12,
    "NVIDIA H100": 989e12, "NVIDIA H200": 989e12, "NVIDIA A100": 312e12,
}


def peak_flops_per_device(device) -> tuple[float | None, str]:
    """(peak FLOP/s or None, where the figure comes from) for MFU.

    Only a known chip has a fixed peak. A CPU's achievable rate depends on what else the
    machine runs (a live-measured 'peak' made identical runs report 40% to 85%), so there
    MFU is not reported; the model FLOP/s per device is.
    """
    for name, flops in PEAK_FLOPS.items():
        if device.device_kind.startswith(name):
            return flops, f"{name} bf16 spec"
    return None, f"{device.device_kind}: no fixed peak, so no MFU"
