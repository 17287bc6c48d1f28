"""The attention heads of one layer as plain float64 arrays, and the maps that leave its function unchanged.

Conversions beyond mean pooling (glm_jax/convert/head_grouping.py, head_merging.py) reorder heads
and fold per-head matrices into the query and output projections. Both are exact
reparametrisations of the layer when done consistently:

- A permutation of the KV heads moves each KV head's block of H / G query heads (and their rows
  of the output projection) with it; the output sums over heads, so nothing changes.
- A key head k_i -> k_i A_i^-T with every query head that reads it q -> q A_i keeps q . k. Under
  RoPE this holds when A_i commutes with the position rotation: any matrix on the dims that do
  not rotate, and on each rotated pair a scaled rotation [[a, b], [-b, a]] (SO(2) is abelian).
  `rope_structure` says which dims pair up for the model's RoPE variant.
- A value head v_i -> v_i B_i with the output rows of its query heads o_h -> B_i^-1 o_h keeps
  the attention output (values are never rotated).

Keys and values are handled with their bias as one more input row ([E + 1, D] per head: [x, 1] @ W).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from glm_jax.model import ModelConfig

PROJECTIONS = ("query", "key", "value", "out")


@dataclasses.dataclass
class LayerHeads:
    """One layer's attention projections, float64: q [E+1, H, D], k and v [E+1, G, D] (the last input row is
    the bias, zero without one), o [H, D, E]."""

    q: np.ndarray
    k: np.ndarray
    v: np.ndarray
    o: np.ndarray

    @property
    def queries_per_kv_head(self) -> int:
        return self.q.shape[1] // self.k.shape[1]

    def permuted(self, kv_order: np.ndarray) -> "LayerHeads":
        """KV head j of the result is head kv_order[j]; each carries its query heads and output rows along."""
        n0 = self.queries_per_kv_head
        query_order = (np.asarray(kv_order)[:, None] * n0 + np.arange(n0)).reshape(-1)
        return LayerHeads(self.q[:, query_order], self.k[:, kv_order], self.v[:, kv_order], self.o[query_order])


def read_layers(attention: dict) -> list[LayerHeads]:
    """The LayerHeads of every layer from a scanned ('layers': leading [L] axis) or per-layer attention tree."""
    stacked = {name: _with_bias_row(attention[name]) for name in ("query", "key", "value")}
    out = np.asarray(attention["out"]["kernel"], np.float64)
    return [LayerHeads(stacked["query"][i], stacked["key"][i], stacked["value"][i], out[i])
            for i in range(out.shape[0])]


def _with_bias_row(projection: dict) -> np.ndarray:
    """kernel [L, E, heads, D] (+ bias [L, heads, D]) -> [L, E + 1, heads, D]."""
    kernel = np.asarray(projection["kernel"], np.float64)
    bias = np.asarray(projection["bias"], np.float64) if "bias" in projection else np.zeros(
        (kernel.shape[0], *kernel.shape[2:]))
    return np.concatenate([kernel, bias[:, None]], axis=1)


def write_layers(attention: dict, layers: list[LayerHeads]) -> dict:
    """A copy of the stacked attention tree with the layers' projections (dtypes kept; biases only where the tree
    has them)."""
    new = {name: dict(attention[name]) for name in attention}
    for name, field in (("query", "q"), ("key", "k"), ("value", "v")):
        full = np.stack([getattr(layer, field) for layer in layers])
        new[name]["kernel"] = full[:, :-1].astype(attention[name]["kernel"].dtype)
        if "bias" in attention[name]:
            new[name]["bias"] = full[:, -1].astype(attention[name]["bias"].dtype)
        elif np.abs(full[:, -1]).max() > 1e-9 * max(np.abs(full).max(), 1e-30):  # beyond the SVD's round-off
            raise ValueError(f"the conversion gave attention/{name} a bias, which this model has none of")
    new["out"]["kernel"] = np.stack([layer.o for layer in layers]).astype(attention["out"]["kernel"].dtype)
    return new


@dataclasses.dataclass(frozen=True)
class RopeStructure:
    """Which head dims rotate together: pairs [(a, b), ...] and the free dims that never rotate."""

    pairs: tuple[tuple[int, int], ...]
    free: tuple[int, ...]


def rope_structure(config: ModelConfig) -> RopeStructure:
    """The rotated pairs of the config's RoPE variant (glm_jax/model/rope.py); no RoPE: every dim is free."""
    D, r = config.head_dim, config.rotary_dim
    if config.position == "rope":
        pairs = _pairs(0, r, config.rope_style)
    elif config.position == "rope_2d":  # two independent RoPEs over the halves of the rotary dims
        pairs = _pairs(0, r // 2, config.rope_style) + _pairs(r // 2, r // 2, config.rope_style)
    else:
        pairs, r = (), 0
    return RopeStructure(tuple(pairs), tuple(range(r, D)))


def _pairs(start: int, width: int, style: str) -> tuple[tuple[int, int], ...]:
    if style == "half":  # dim j with j + width / 2
        return tuple((start + j, start + j + width // 2) for j in range(width // 2))
    return tuple((start + 2 * i, start + 2 * i + 1) for i in range(width // 2))  # interleaved
