"""Which KV heads share a group: by index (the GQA paper) or by similarity.

contiguous  heads [g n, (g + 1) n) form group g (Ainslie et al. 2023, arXiv 2305.13245).
similarity  balanced groups of heads that are close to one another (AsymGQA, arXiv 2406.14963;
            QCQA, arXiv 2406.10247 search for groupings that keep the merged model close to the
            source). The cost of a grouping is what mean-pooling it loses: the sum over groups of
            the squared distances between members' features, n x sum ||x_i - mean||^2. Features are
            each head's key and value activations on a calibration batch of the run's own data
            (glm_jax/convert/calibration.py), or its key and value kernels (+ bias) without one.
            A greedy start (each group seeded with the lowest unassigned head, filled with its
            nearest unassigned heads) is improved by exchanging members between groups until no
            exchange lowers the cost.

The result is a permutation of the KV heads that makes the groups contiguous; LayerHeads.permuted
applies it to keys, values and (with their query heads) queries and outputs, which leaves the
layer's function unchanged, so the merge that follows sees contiguous groups either way.
"""

from __future__ import annotations

import numpy as np

GROUPINGS = ("contiguous", "similarity")


def squared_distances(features: np.ndarray) -> np.ndarray:
    """features [heads, F] -> [heads, heads] squared Euclidean distances."""
    norms = (features ** 2).sum(axis=1)
    return np.maximum(norms[:, None] + norms[None, :] - 2 * features @ features.T, 0.0)


def grouping_cost(distances: np.ndarray, groups: list[list[int]]) -> float:
    return float(sum(distances[np.ix_(g, g)].sum() / 2 for g in groups))


def similarity_groups(distances: np.ndarray, group_size: int, max_rounds: int = 100) -> list[list[int]]:
    """Balanced groups of `group_size` heads with a low grouping_cost: greedy start, then pairwise exchanges."""
    heads = distances.shape[0]
    unassigned, groups = list(range(heads)), []
    while unassigned:
        seed = unassigned[0]
        nearest = sorted(unassigned[1:], key=lambda h: (distances[seed, h], h))[:group_size - 1]
        groups.append([seed, *nearest])
        unassigned = [h for h in unassigned if h not in groups[-1]]
    for _ in range(max_rounds):
        if not _best_exchange(distances, groups):
            break
    return [sorted(g) for g in sorted(groups, key=min)]


def _best_exchange(distances: np.ndarray, groups: list[list[int]]) -> bool:
    """Applies the member exchange between two groups that lowers the cost most; False if none does."""
    best_gain, move = 1e-12 * max(float(distances.max()), 1e-30), None
    for a in range(len(groups)):
        for b in range(a + 1, len(groups)):
            for i, x in enumerate(groups[a]):
                for j, y in enumerate(groups[b]):
                    rest_a = [h for h in groups[a] if h != x]
                    rest_b = [h for h in groups[b] if h != y]
                    gain = (distances[x, rest_a].sum() + distances[y, rest_b].sum()
                            - distances[y, rest_a].sum() - distances[x, rest_b].sum())
                    if gain > best_gain:
                        best_gain, move = gain, (a, i, b, j)
    if move is None:
        return False
    a, i, b, j = move
    groups[a][i], groups[b][j] = groups[b][j], groups[a][i]
    return True


def kv_order(num_heads: int, num_groups: int, grouping: str, features: np.ndarray | None = None) -> np.ndarray:
    """The permutation of the heads that puts each group's members next to each other (groups in order of their
    lowest head, members ascending). features: [heads, F] (similarity only)."""
    if grouping not in GROUPINGS:
        raise ValueError(f"grouping {grouping!r} is unknown; use one of {GROUPINGS}")
    if grouping == "contiguous" or num_heads == num_groups:
        return np.arange(num_heads)
    groups = similarity_groups(squared_distances(features), num_heads // num_groups)
    return np.asarray([h for group in groups for h in group])
