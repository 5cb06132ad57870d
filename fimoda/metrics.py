"""Evaluation of approximate attributions against the further-training gold standard (paper §6.1,
App. D.5, E.1).

Shapes: gold scores ``a[i, t, j]`` (left-out i, evaluation point t, test j) from
:func:`fimoda.gold.gold_scores`; method scores ``s[j, i]`` (test x left-out).
Per test point j the cosine similarity is taken over the left-out instances i; curves are the
mean +- standard error over test points as a function of t. :func:`lds` is the field's other
yardstick, the linear datamodeling score (Park et al. 2023), over models trained on subsets.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
from scipy.stats import rankdata

__all__ = ["cosine", "vector_cosine", "spearman", "mean_se", "curve", "peak_over_eval_points", "lds", "LDS",
           "roc_auc", "method_agreement"]


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


def vector_cosine(a, b) -> float:
    """cos(a, b) of two vectors of scores over the same instances, 0 where either is all
    zero (the convention of :func:`cosine`)."""
    a, b = np.asarray(a, dtype=np.float64).ravel(), np.asarray(b, dtype=np.float64).ravel()
    if a.shape != b.shape:
        raise ValueError(f"vector_cosine needs two vectors of one length, got {a.shape}, {b.shape}")
    return float(_cos(a, b, axis=0))


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


class LDS(NamedTuple):
    """A linear datamodeling score: ``per_test`` (J,) Spearman correlations (NaN where a test
    point's outputs or summed scores are constant over the subsets), their ``mean`` and standard
    error ``se`` over the test points where it is defined, and how many those are (``n_test``)."""
    per_test: np.ndarray
    mean: float
    se: float
    n_test: int


def _subset_mask(subsets, n: int) -> np.ndarray:
    """(M, n) bool membership of every subset: from a bool mask (M, n) or (M, k) column
    indices."""
    sub = np.asarray(subsets)
    if sub.ndim != 2 or sub.shape[0] < 3:
        raise ValueError(f"subsets must be 2-D, one row per subset (at least 3 subsets for a "
                         f"rank correlation), got shape {sub.shape}")
    if sub.dtype == bool:
        if sub.shape[1] != n:
            raise ValueError(f"a subset mask needs one column per scored instance ({n}), "
                             f"got {sub.shape[1]}")
        return sub
    if not np.issubdtype(sub.dtype, np.integer):
        raise ValueError(f"subsets must be column indices (integers) or a bool mask, got "
                         f"dtype {sub.dtype}")
    if sub.size and (sub.min() < 0 or sub.max() >= n):
        raise ValueError(f"subset indices must be columns of the scores, in [0, {n})")
    mask = np.zeros((len(sub), n), dtype=bool)
    np.put_along_axis(mask, sub, True, axis=1)
    if (mask.sum(1) != sub.shape[1]).any():
        raise ValueError("a subset repeats an index")
    return mask


def lds(scores, subsets, outputs, target: str = "loss") -> LDS:
    """The linear datamodeling score of attribution ``scores`` against models trained on subsets.

    Conventions:
    - ``scores[j, i]``: fimoda's layout and sign (:func:`fimoda.attribute`, gold scores
      transposed): test point j, scored instance i (column i, e.g. ``left_out[i]``); positive
      means the test loss rises when i is left out, i.e. i helps z_j.
    - ``subsets``: the instances each model was trained WITH (as TRAK and dattri), as column
      indices into ``scores`` (M, k), or a bool mask (M, n'). Instances that are not scored
      (not columns) are in every model's training set and add a constant.
    - ``outputs[m, j]``: the measured output of model m at test point j, with ``target="loss"``
      its test loss, else (``"utility"``) any output where higher is better (the margin, the
      negated loss).

    Sign: a loss target is negated, as dattri does, so that the linear datamodel predicts
    -loss_m(z_j) ~ const + sum_{i in subset m} scores[j, i] (training on helpful instances
    lowers the loss) and a good method has LDS near +1 whatever the target. The LDS per test
    point is the Spearman correlation across the M subsets between the measured target and the
    summed score (ties get average ranks, as ``scipy.stats.spearmanr``); the summary is the mean
    +- standard error over test points. The same inputs give ``dattri.metric.lds(scores.T,
    (-outputs, subsets))`` for a loss.
    """
    if target not in ("loss", "utility"):
        raise ValueError(f"target must be 'loss' or 'utility', got {target!r}")
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(outputs, dtype=np.float64)
    if s.ndim != 2:
        raise ValueError(f"scores must be (test, scored instances), got shape {s.shape}")
    mask = _subset_mask(subsets, s.shape[1])
    if y.shape != (len(mask), s.shape[0]):
        raise ValueError(f"outputs must be (subsets, test) = {(len(mask), s.shape[0])}, "
                         f"got {y.shape}")
    if not (np.isfinite(s).all() and np.isfinite(y).all()):
        raise ValueError("scores or outputs contain NaN or inf")
    predicted = mask.astype(np.float64) @ s.T                  # (M, J): summed score per subset
    measured = -y if target == "loss" else y
    rp = rankdata(predicted, axis=0)
    rm = rankdata(measured, axis=0)
    rp, rm = rp - rp.mean(0), rm - rm.mean(0)
    den = np.sqrt((rp ** 2).sum(0) * (rm ** 2).sum(0))
    with np.errstate(invalid="ignore", divide="ignore"):
        per = np.where(den > 0, (rp * rm).sum(0) / np.where(den > 0, den, 1.0), np.nan)
    ok = np.isfinite(per)
    if not ok.any():
        raise ValueError("the LDS is undefined at every test point (outputs or summed scores "
                         "constant across the subsets)")
    m, se = mean_se(per[ok])
    return LDS(per, float(m), float(se), int(ok.sum()))


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
