"""How a group of KV heads becomes one: the merges of `glm_jax convert uptrain --method`.

The group's heads are contiguous (glm_jax/convert/head_grouping.py orders them). Each merge gives the
shared key and value head and, where it reparametrises, the matrices folded into the query heads
(keys) and output rows (values) of each member, as glm_jax/convert/head_tensors.py describes:

mean      the members' mean (Ainslie et al. 2023, arXiv 2305.13245).
first     the first member.
weighted  a mean weighted by each member's norm: its activations' RMS on the calibration batch,
          its kernel's norm without one (a static form of WGQA's weights, arXiv 2407.10855,
          which learns them during uptraining).
aligned   each member rotated onto the group before averaging (orthogonal Procrustes; Jin et al.,
          arXiv 2412.20677), the rotation folded into the member's query heads (keys) or output rows
          (values), so every member's scores and outputs are unchanged before the averaging. Key
          rotations are restricted to maps that commute with RoPE: a 2D rotation on each rotated
          pair, any orthogonal map on the dims that do not rotate. The group's reference is
          refined by generalised Procrustes (align to it, average, repeat).
svd       a low-rank shared head: the members' [E + 1, n D] side-by-side kernels reduced to their
          best rank-D factor (shared head x per-member maps, cf. DHA arXiv 2406.06567 and MHA2MLA
          arXiv 2502.14837), the maps folded like the rotations; on rotated key pairs the factor is
          the best rank-1 complex one, whose per-member maps are scaled rotations, which commute
          with RoPE. The merged model is the best D-dimensional shared basis of the group's kernels.

With one head per group every merge returns the layer unchanged.
"""

from __future__ import annotations

import numpy as np

from glm_jax.convert.head_tensors import LayerHeads, RopeStructure

MERGES = ("mean", "first", "weighted", "aligned", "svd")
PROCRUSTES_ROUNDS = 3


def merge_layer(layer: LayerHeads, num_groups: int, merge: str, rope: RopeStructure,
                key_features: np.ndarray | None = None, value_features: np.ndarray | None = None) -> LayerHeads:
    """layer with G0 KV heads -> num_groups KV heads (contiguous groups). key_features / value_features:
    [N, G0, D] activations on a calibration batch (weighted, aligned), else the kernels stand in."""
    if merge not in MERGES:
        raise ValueError(f"merge {merge!r} is unknown; use one of {MERGES}")
    G0, n0 = layer.k.shape[1], layer.queries_per_kv_head
    n = G0 // num_groups
    if n == 1:
        return layer
    q, o, keys, values = layer.q.copy(), layer.o.copy(), [], []
    for g in range(num_groups):
        members = range(g * n, (g + 1) * n)
        k = [layer.k[:, i] for i in members]
        v = [layer.v[:, i] for i in members]
        kx = k if key_features is None else [key_features[:, i] for i in members]
        vx = v if value_features is None else [value_features[:, i] for i in members]
        shared_key, query_maps = _merge_keys(k, kx, merge, rope)
        shared_value, output_maps = _merge_values(v, vx, merge)
        for member, i in enumerate(members):
            for h in range(i * n0, (i + 1) * n0):
                q[:, h] = q[:, h] @ query_maps[member]
                o[h] = output_maps[member] @ o[h]
        keys.append(shared_key)
        values.append(shared_value)
    return LayerHeads(q, np.stack(keys, axis=1), np.stack(values, axis=1), o)


def _merge_keys(k, features, merge: str, rope: RopeStructure):
    """(shared key head [E+1, D], per-member query maps A_i: member i's queries become q A_i)."""
    D = k[0].shape[1]
    identity = [np.eye(D)] * len(k)
    if merge in ("mean", "first", "weighted"):
        return _plain_merge(k, features, merge), identity
    if merge == "aligned":
        rotations = _generalised_procrustes(features, lambda x, y: rope_procrustes(x, y, rope))
        return np.mean([ki @ r for ki, r in zip(k, rotations)], axis=0), rotations  # k_i ~ shared R_i^T
    shared, maps = _low_rank_keys(k, rope)
    return shared, [m.T for m in maps]  # k_i ~ shared B_i: q . k_i = (q B_i^T) . shared


def _merge_values(v, features, merge: str):
    """(shared value head [E+1, D], per-member output maps B_i: member i's output rows become B_i o)."""
    D = v[0].shape[1]
    if merge in ("mean", "first", "weighted"):
        return _plain_merge(v, features, merge), [np.eye(D)] * len(v)
    if merge == "aligned":
        rotations = _generalised_procrustes(features, orthogonal_procrustes)
        return np.mean([vi @ r for vi, r in zip(v, rotations)], axis=0), [r.T for r in rotations]
    shared, maps = _low_rank(v)
    return shared, maps  # v_i ~ shared B_i: (a v_i) o = (a shared)(B_i o)


def _plain_merge(heads, features, merge: str) -> np.ndarray:
    if merge == "first":
        return heads[0]
    if merge == "mean":
        return np.mean(heads, axis=0)
    norms = np.asarray([np.sqrt(np.mean(f ** 2)) for f in features])
    return np.tensordot(norms / norms.sum(), np.stack(heads), axes=1)


def orthogonal_procrustes(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """The orthogonal R minimising ||x R - y|| (x, y [N, D]): U V^T of svd(x^T y)."""
    u, _, vt = np.linalg.svd(x.T @ y)
    return u @ vt


def rope_procrustes(x: np.ndarray, y: np.ndarray, rope: RopeStructure) -> np.ndarray:
    """orthogonal_procrustes restricted to maps that commute with RoPE: on each rotated pair the 2D rotation
    [[c, s], [-s, c]] maximising trace(R^T x_p^T y_p), on the free dims any orthogonal map."""
    D = x.shape[1]
    r = np.zeros((D, D))
    for a, b in rope.pairs:
        m = x[:, [a, b]].T @ y[:, [a, b]]
        angle = np.arctan2(m[0, 1] - m[1, 0], m[0, 0] + m[1, 1])
        c, s = np.cos(angle), np.sin(angle)
        r[np.ix_([a, b], [a, b])] = [[c, s], [-s, c]]
    if rope.free:
        free = list(rope.free)
        r[np.ix_(free, free)] = orthogonal_procrustes(x[:, free], y[:, free])
    return r


def _generalised_procrustes(features, procrustes) -> list[np.ndarray]:
    """Rotations of each member onto the group's reference: the first member, then the mean of the aligned
    members, PROCRUSTES_ROUNDS times."""
    reference = features[0]
    for _ in range(PROCRUSTES_ROUNDS):
        rotations = [procrustes(f, reference) for f in features]
        reference = np.mean([f @ r for f, r in zip(features, rotations)], axis=0)
    return rotations


def _low_rank(heads) -> tuple[np.ndarray, list[np.ndarray]]:
    """[E+1, D] x n -> (shared [E+1, D], maps B_i [D, D]) with heads[i] ~ shared B_i: the best rank-D factor
    of the side-by-side [E+1, n D] matrix."""
    D = heads[0].shape[1]
    u, s, vt = np.linalg.svd(np.concatenate(heads, axis=1), full_matrices=False)
    shared = u[:, :D] * s[:D]
    return shared, [vt[:D, i * D:(i + 1) * D] for i in range(len(heads))]


def _low_rank_keys(k, rope: RopeStructure) -> tuple[np.ndarray, list[np.ndarray]]:
    """_low_rank for keys under RoPE: the free dims as _low_rank; each rotated pair as one complex column per
    member, reduced to its best rank-1 complex factor c lambda_i, whose map (multiplication by lambda_i)
    is a scaled rotation."""
    E1, D = k[0].shape
    shared, maps = np.zeros((E1, D)), [np.zeros((D, D)) for _ in k]
    for a, b in rope.pairs:
        z = np.stack([ki[:, a] + 1j * ki[:, b] for ki in k], axis=1)  # [E+1, n]
        u, s, vh = np.linalg.svd(z, full_matrices=False)
        column = u[:, 0] * s[0]
        shared[:, a], shared[:, b] = column.real, column.imag
        for m, scale in zip(maps, vh[0]):  # z_i ~ column * lambda_i, lambda_i = vh[0, i]
            m[np.ix_([a, b], [a, b])] = [[scale.real, scale.imag], [-scale.imag, scale.real]]
    if rope.free:
        free = list(rope.free)
        free_shared, free_maps = _low_rank([ki[:, free] for ki in k])
        shared[:, free] = free_shared
        for m, fm in zip(maps, free_maps):
            m[np.ix_(free, free)] = fm
    return shared, maps
