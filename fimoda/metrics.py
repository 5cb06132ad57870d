"""Evaluation of approximate attributions against the further-training gold standard (paper §6.1,
App. D.5, E.1).

Shapes: gold scores ``a[i, t, j]`` (left-out i, evaluation point t, test j) from
:func:`fimoda.gold.gold_scores`; method scores ``s[j, i]`` (test x left-out).
Per test point j the cosine similarity is taken over the left-out instances i; curves are the
mean +- standard error over test points as a function of t.
"""
from __future__ import annotations

import numpy as np
from scipy.stats import rankdata


def _check(gold: np.ndarray, scores: np.ndarray):
    gold, scores = np.asarray(gold, dtype=np.float64), np.asarray(scores, dtype=np.float64)
    if gold.ndim != 3:
        raise ValueError(f"gold scores must be (left-out, eval points, test), got {gold.shape}")
    if scores.shape != (gold.shape[2], gold.shape[0]):
        raise ValueError(f"method scores must be (test, left-out) = "
                         f"{(gold.shape[2], gold.shape[0])}, got {scores.shape}")
    if not np.all(np.isfinite(scores)):
        raise ValueError("method scores contain NaN or inf")
    return gold, scores


def _cos(a: np.ndarray, b: np.ndarray, axis: int) -> np.ndarray:
    num = (a * b).sum(axis)
    den = np.linalg.norm(a, axis=axis) * np.linalg.norm(b, axis=axis)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), 0.0)


def cosine(gold: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """cos(a_gold[:, t, j], s[j, :]) for every t and j: (T_eval, J)."""
    gold, scores = _check(gold, scores)
    return _cos(gold, scores.T[:, None, :], axis=0)


def spearman(gold: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Spearman rank correlation over the left-out set, per (t, j): (T_eval, J)."""
    gold, scores = _check(gold, scores)
    rg = rankdata(gold, axis=0)
    rs = rankdata(scores.T, axis=0)[:, None, :]
    rg = rg - rg.mean(0, keepdims=True)
    rs = rs - rs.mean(0, keepdims=True)
    return _cos(rg, rs, axis=0)


def mean_se(values: np.ndarray, axis: int = -1):
    """Mean and standard error of the mean along ``axis``."""
    values = np.asarray(values, dtype=np.float64)
    n = values.shape[axis]
    se = values.std(axis=axis, ddof=1) / np.sqrt(n) if n > 1 else np.zeros_like(values.mean(axis))
    return values.mean(axis=axis), se


def curve(gold: np.ndarray, scores: np.ndarray, metric: str = "cosine"):
    """(mean, se) over test points of the per-test metric, as a function of the eval point."""
    fn = {"cosine": cosine, "spearman": spearman}[metric]
    return mean_se(fn(gold, scores), axis=1)


def peak_over_eval_points(group_gold: np.ndarray, scores: np.ndarray,
                          metric: str = "cosine"):
    """Max over eval points of the mean metric, with gold from groups of k seeds (App. E.1).

    ``group_gold``: (groups, i, t, j) from :func:`fimoda.gold.seed_group_scores`.
    The metric is computed per group and test point, averaged over both (mean, se), then the
    maximum over eval points is taken. Returns (max mean, se at the argmax, argmax t).
    """
    fn = {"cosine": cosine, "spearman": spearman}[metric]
    per = np.stack([fn(g, scores) for g in group_gold])          # (groups, t, j)
    flat = per.transpose(1, 0, 2).reshape(per.shape[1], -1)       # (t, groups*j)
    m, se = mean_se(flat, axis=1)
    t = int(np.argmax(m))
    return float(m[t]), float(se[t]), t


def roc_auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve of ``scores`` for the binary labels ``positive`` (ties
    counted half), as in mislabelled-example detection (App. E.2)."""
    scores, positive = np.asarray(scores, float), np.asarray(positive, bool)
    n_pos, n_neg = positive.sum(), (~positive).sum()
    if n_pos == 0 or n_neg == 0:
        raise ValueError("AUC needs both positive and negative examples")
    ranks = rankdata(scores)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def method_agreement(all_scores: dict) -> tuple[list, np.ndarray]:
    """Mean over test points of the cosine between every pair of methods' score vectors."""
    names = list(all_scores)
    M = np.eye(len(names))
    for a in range(len(names)):
        for b in range(a + 1, len(names)):
            sa, sb = np.asarray(all_scores[names[a]]), np.asarray(all_scores[names[b]])
            M[a, b] = M[b, a] = float(_cos(sa, sb, axis=1).mean())
    return names, M
