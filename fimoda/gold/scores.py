"""The gold attribution scores from further-training losses: eq. (13) (adjusted by the mean over
the left-out set) or eq. (17) (adjusted by the full run), averaged over all seeds or over
disjoint groups of seeds."""
from __future__ import annotations

import numpy as np

ADJUSTMENTS = ("mean", "full")


def gold_scores(loss_full, loss_loo, adjust: str = "mean", seeds=None) -> np.ndarray:
    """Gold attribution scores a[i, t, j] from further-training losses (float64).

    ``adjust="full"``, eq. (17): a = mean_s (loss_loo[s, i] - loss_full[s]).
    ``adjust="mean"``, eq. (13): a = mean_s (loss_loo[s, i] - mean_i' loss_loo[s, i']), which
    equals (17) minus its mean over the left-out set (``loss_full`` may then be None).
    ``seeds``: positions along the seed axis to average over (default all).
    """
    if adjust not in ADJUSTMENTS:
        raise ValueError(f"unknown adjust {adjust!r}; choose from {ADJUSTMENTS}")
    loo = np.asarray(loss_loo, dtype=np.float64)
    if loo.ndim != 4:
        raise ValueError(f"loss_loo must be (S, n', T, J), got shape {loo.shape}")
    sel = slice(None) if seeds is None else np.asarray(seeds)
    loo = loo[sel]
    if loo.shape[0] == 0:
        raise ValueError("no seeds selected")
    if adjust == "mean":
        return (loo - loo.mean(axis=1, keepdims=True)).mean(axis=0)
    full = np.asarray(loss_full, dtype=np.float64)
    if full.ndim != 3 or full.shape[0] != np.asarray(loss_loo).shape[0] \
            or full.shape[1:] != loo.shape[2:]:
        raise ValueError(f"loss_full must be (S, T, J) matching loss_loo {np.shape(loss_loo)}, "
                         f"got {full.shape}")
    return (loo - full[sel][:, None]).mean(axis=0)


def seed_group_scores(loss_full, loss_loo, k: int, adjust: str = "mean") -> np.ndarray:
    """Gold scores from S // k disjoint groups of k consecutive seeds (App. E.1, number-of-seeds
    study): (groups, n', T, J); group g averages seeds g k .. g k + k - 1."""
    S = np.shape(loss_loo)[0]
    if not (isinstance(k, (int, np.integer)) and 1 <= k <= S):
        raise ValueError(f"k must be an integer in [1, {S}], got {k!r}")
    return np.stack([gold_scores(loss_full, loss_loo, adjust, seeds=np.arange(g * k, g * k + k))
                     for g in range(S // k)])
