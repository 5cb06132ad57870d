"""Group leave-out against the sum of single leave-outs: how additive is further training's
response to removing a set S of training instances, and how well does a method's summed score
rank the groups?

Shapes. The leave-one-out gold a[i, t, j] over the left-out set L (:func:`fimoda.gold.gold_scores`
of notebook 02's runs); the group gold g[r, t, j] of group runs r (:func:`fimoda.gold.gold_scores`
of runs that each leave out a group); ``positions`` (m, G): each group's members as positions in
L (columns of a method's ``scores[j, i]``), padded with -1 as :func:`fimoda.gold.groups.as_left_out`
pads training indices.

- :func:`additive_estimate`: sum_{i in S_r} a[i, t, j], the group gold if removals added up;
- :func:`additivity_error`: per group and evaluation point, over the test points, the relative L2
  error |g - sum a| / |g| and 1 - cos(g, sum a);
- :func:`group_score`: a method's summed score sum_{i in S_r} scores[j, i];
- :func:`paired_cosine`: per (t, j), the cosine over groups of two arrays that both move with t
  (the group gold against the leave-one-out gold's sums).
"""
from __future__ import annotations

import numpy as np

from ..metrics import cosine

__all__ = ["membership", "additive_estimate", "additivity_error", "group_score", "paired_cosine"]


def membership(positions, n: int) -> np.ndarray:
    """(m, n) float64 0/1 matrix: row r marks the members of group r (``positions`` (m, G),
    entries in [0, n) or -1 padding; a repeated member or an out-of-range one is a ValueError)."""
    pos = np.asarray(positions)
    if pos.ndim != 2 or not np.issubdtype(pos.dtype, np.integer):
        raise ValueError(f"positions must be a 2-D integer array (groups, members), got "
                         f"{pos.dtype} {pos.shape}")
    if pos.size and (pos.max() >= n or pos.min() < -1):
        raise ValueError(f"positions must lie in [0, {n}) (or be -1 padding)")
    M = np.zeros((len(pos), n))
    for r, row in enumerate(pos):
        row = row[row >= 0]
        if len(row) == 0 or len(np.unique(row)) != len(row):
            raise ValueError(f"group {r} is empty or repeats a member: {row.tolist()}")
        M[r, row] = 1.0
    return M


def additive_estimate(loo_gold, positions) -> np.ndarray:
    """(m, T, J): sum over each group's members of the leave-one-out gold ``loo_gold``
    (|L|, T, J)."""
    a = np.asarray(loo_gold, dtype=np.float64)
    if a.ndim != 3:
        raise ValueError(f"loo_gold must be (left-out, eval points, test), got {a.shape}")
    return np.einsum("ri,itj->rtj", membership(positions, a.shape[0]), a)


def additivity_error(group_gold, additive) -> dict:
    """Per group r and evaluation point t, over the test points j: ``rel_l2`` (m, T),
    |g[r, t] - additive[r, t]| / |g[r, t]|, and ``one_minus_cos`` (m, T), 1 - cos(g[r, t],
    additive[r, t]); NaN where the group gold is identically zero (t = 0, theta^f itself)."""
    g = np.asarray(group_gold, dtype=np.float64)
    s = np.asarray(additive, dtype=np.float64)
    if g.shape != s.shape or g.ndim != 3:
        raise ValueError(f"group_gold and additive must both be (groups, eval points, test), "
                         f"got {g.shape} and {s.shape}")
    ng, ns = np.linalg.norm(g, axis=2), np.linalg.norm(s, axis=2)
    ok = ng > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        rel = np.where(ok, np.linalg.norm(g - s, axis=2) / np.where(ok, ng, 1.0), np.nan)
        both = ok & (ns > 0)
        cos = np.where(both, (g * s).sum(2) / np.where(both, ng * ns, 1.0), np.nan)
    # cos <= 1 up to rounding: 1 - cos clipped at 0
    return {"rel_l2": rel,
            "one_minus_cos": np.where(ok, np.maximum(1.0 - np.nan_to_num(cos), 0.0), np.nan)}


def group_score(scores, positions) -> np.ndarray:
    """(J, m): a method's ``scores[j, i]`` (test x left-out) summed over each group's members,
    the layout of a method's scores with the groups as its columns."""
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 2:
        raise ValueError(f"scores must be (test, left-out), got {s.shape}")
    return s @ membership(positions, s.shape[1]).T


def paired_cosine(a, b) -> np.ndarray:
    """(T, J): cos(a[:, t, j], b[:, t, j]) over the first axis (groups, or left-out instances)
    for every t and j, for two arrays (m, T, J) that both depend on t."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 3:
        raise ValueError(f"a and b must both be (m, eval points, test), got {a.shape}, {b.shape}")
    return np.stack([cosine(a[:, t:t + 1], b[:, t].T)[0] for t in range(a.shape[1])])
