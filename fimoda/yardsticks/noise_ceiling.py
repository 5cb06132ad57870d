"""The gold standard's own noise ceiling: the cosine that the exact answer would reach against a
K-seed gold standard.

Model. Seed s's gold vector over the left-out set, g_s = a + e_s (per evaluation point t and test
point j; :func:`fimoda.gold.gold_scores` of that seed alone), is the exact answer a (the
infinitely-many-seed gold) plus seed noise e_s, independent across seeds with mean 0 and
covariance Sigma. The K-seed gold is g = a + e with E|e|^2 = tr(Sigma) / K, so

    cos(a, g)^2  ~  |a|^2 / (|a|^2 + tr(Sigma) / K)  =  K R / (K R + 1),   R = |a|^2 / tr(Sigma),

R being the signal-to-noise ratio of ONE seed. This is a ratio of expectations: it is the
expected cosine when the noise spreads over many directions (|e|^2 and a.e concentrate), the
regime of a few hundred left-out instances. A method's cosine to the K-seed gold is then capped
near cos(s, a) x ceiling: the ceiling is what the exact answer itself would score.

Estimator. Both terms come from the K seeds without bias: the mean inner product of two
DIFFERENT seeds' vectors estimates |a|^2 (E g_s.g_s' = |a|^2 for s != s'), and |g|^2 estimates
|a|^2 + tr(Sigma)/K, so

    ceiling^2 = mean_{s != s'} g_s.g_s' / |g|^2
              = K (|sum_s g_s|^2 - sum_s |g_s|^2) / ((K - 1) |sum_s g_s|^2),

clipped to [0, 1]. It is the split-half agreement with its Spearman-Brown correction to K
(r = cos(g_A, g_B) of two halves, ceiling^2 = 2r / (1 + r)) averaged over every way of pairing the
seeds instead of one split, so it has less variance and needs no even K. The same R gives the
ceiling of any number of seeds (:meth:`NoiseCeiling.for_seeds`) and the seeds a target ceiling
needs (:meth:`NoiseCeiling.seeds_for`; from a ceiling alone, :func:`seeds_needed`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from ..gold.scores import gold_scores
from ..metrics import mean_se

__all__ = ["NoiseCeiling", "noise_ceiling", "gold_noise_ceiling", "seeds_needed"]


@dataclass
class NoiseCeiling:
    """Per evaluation point t and test point j: ``ceiling`` (T, J), the estimated cosine of the
    exact answer to the ``n_seeds``-seed gold (NaN where the gold is identically zero, e.g. t = 0,
    theta^f itself); ``snr`` (T, J), R = |a|^2 / tr(Sigma) of one seed (>= 0; NaN likewise);
    ``eval_points`` (T,)."""
    ceiling: np.ndarray
    snr: np.ndarray
    n_seeds: int
    eval_points: np.ndarray

    def mean(self):
        """(mean, standard error) of the ceiling over the test points where it is defined, each
        (T,): a test point whose left-out runs all kept the same test loss in every seed (no
        gold to compare; in float32, differences below round-off) is left out, as in
        :meth:`fraction`; NaN where no test point has a ceiling (t = 0)."""
        return _mean_over_tests(self.ceiling)

    def for_seeds(self, k) -> np.ndarray:
        """(T, J): the ceiling a gold standard of ``k`` seeds would have, sqrt(k R / (k R + 1))."""
        k = float(k)
        if not k > 0:
            raise ValueError(f"the number of seeds must be positive, got {k}")
        with np.errstate(invalid="ignore"):
            return np.sqrt(k * self.snr / (k * self.snr + 1.0))

    def seeds_for(self, ceiling: float) -> np.ndarray:
        """(T, J): the seeds a gold standard needs for its ceiling to reach ``ceiling``,
        c^2 / ((1 - c^2) R) (inf where R = 0), not rounded."""
        c = float(ceiling)
        if not 0 < c < 1:
            raise ValueError(f"a target ceiling lies in (0, 1), got {c}")
        with np.errstate(divide="ignore", invalid="ignore"):
            return c * c / ((1 - c * c) * self.snr)

    def select(self, index) -> "NoiseCeiling":
        """The ceiling at the evaluation points ``index`` (an index or slice of the first axis),
        e.g. ``select(slice(1, None))`` without t = 0."""
        pick = lambda v: np.atleast_1d(np.asarray(v)[index])
        return NoiseCeiling(pick(self.ceiling), pick(self.snr), self.n_seeds,
                            pick(self.eval_points))

    def peak_for_seeds(self, ks) -> "NoiseCeiling":
        """For each k of ``ks``: the ceiling a gold standard of k seeds would have
        (:meth:`for_seeds`, per test point) at the evaluation point where its mean over test
        points is highest -- what caps a method's maximum cosine over further training to a
        k-seed gold (the seeds figure, paper App. E.1). A NoiseCeiling whose first axis runs
        over ``ks`` (its ``eval_points`` are ``ks``; NaN where no point has a ceiling)."""
        rows, snr = [], []
        for k in ks:
            c = self.for_seeds(k)
            mean = _mean_over_tests(c)[0]
            t = int(np.argmax(np.where(np.isfinite(mean), mean, -np.inf)))   # NaN never wins
            rows.append(c[t])
            snr.append(self.snr[t])
        return NoiseCeiling(np.stack(rows), np.stack(snr), self.n_seeds, np.asarray(ks))

    def table(self, targets=(0.9,), max_rows: Optional[int] = None):
        """Per evaluation point: the mean ceiling over test points and its standard error, and
        the seeds a gold standard needs for its mean ceiling to reach each of ``targets``
        (:func:`seeds_needed` of the mean, rounded up; inf where the ceiling is 0, NaN where
        undefined): a pandas DataFrame indexed by evaluation point. ``max_rows``: at most that
        many evaluation points, evenly spaced, the first and the last among them."""
        import pandas as pd
        mean, se = self.mean()
        cols = {"ceiling": mean, "se": se}
        for c in targets:
            need = seeds_needed(mean, self.n_seeds, c)
            cols[f"seeds for {c:g}"] = np.where(np.isfinite(need), np.ceil(need), need)
        table = pd.DataFrame(cols, index=pd.Index(self.eval_points, name="eval point"))
        if max_rows is not None and len(table) > max_rows:
            keep = np.linspace(0, len(table) - 1, max_rows).round().astype(int)
            table = table.iloc[np.unique(keep)]
        return table

    def fraction(self, cosines) -> np.ndarray:
        """A method's cosine to the gold as a fraction of the ceiling, per evaluation point (T,):
        the mean over test points of ``cosines`` (T, J) (:func:`fimoda.metrics.cosine`) over the
        mean ceiling over the same test points (ratio of means: a per-test ratio would blow up
        where a test point's ceiling is near 0). About cos(method, exact answer)."""
        c = np.asarray(cosines, dtype=np.float64)
        if c.shape != self.ceiling.shape:
            raise ValueError(f"cosines must be (eval points, test) = {self.ceiling.shape}, got "
                             f"{c.shape}")
        ok = np.isfinite(self.ceiling)
        with np.errstate(invalid="ignore", divide="ignore"):
            num = np.where(ok, c, 0.0).sum(1)
            den = np.where(ok, self.ceiling, 0.0).sum(1)
            return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def _mean_over_tests(c: np.ndarray):
    """(mean, standard error) over axis 1 of ``c`` (T, J), each over its finite entries only;
    NaN where a row has none."""
    rows = [mean_se(r[np.isfinite(r)]) if np.isfinite(r).any() else (np.nan, np.nan) for r in c]
    return (np.array([float(m) for m, _ in rows]), np.array([float(e) for _, e in rows]))


def noise_ceiling(loss_full, loss_loo, adjust: str = "mean",
                  eval_points: Optional[np.ndarray] = None) -> NoiseCeiling:
    """The noise ceiling of the gold standard of ``loss_full`` (S, T, J) and ``loss_loo``
    (S, n', T, J) as :func:`fimoda.gold.further_train` returns them, averaged over all S seeds
    with the adjustment ``adjust`` of :func:`fimoda.gold.gold_scores` (the estimator: module
    docstring). Needs S >= 2 seeds and n' >= 2 left-out runs."""
    loo = np.asarray(loss_loo)
    if loo.ndim != 4:
        raise ValueError(f"loss_loo must be (S, n', T, J), got shape {loo.shape}")
    K, n_loo, T, J = loo.shape
    if K < 2:
        raise ValueError(f"the noise ceiling compares seeds: it needs at least 2, got {K}")
    if n_loo < 2:
        raise ValueError("the noise ceiling needs at least 2 left-out runs (a cosine over them)")
    total = np.zeros((n_loo, T, J))
    sq = np.zeros((T, J))
    moved = np.zeros((T, J), dtype=bool)                 # any run's test loss differs
    for s in range(K):                                   # one seed at a time: bounded memory
        g = gold_scores(loss_full, loss_loo, adjust, seeds=[s])      # (n', T, J)
        total += g
        sq += (g * g).sum(0)
        moved |= (loo[s] != loo[s, :1]).any(0)
        if adjust == "full":
            moved |= (loo[s] != np.asarray(loss_full)[s]).any(0)
    tot_sq = (total * total).sum(0)                      # |sum_s g_s|^2
    signal = (tot_sq - sq) / (K * (K - 1))               # mean over pairs s != s' of g_s.g_s'
    noise = (sq - tot_sq / K) / (K - 1)                  # tr(Sigma): the seeds' summed variance
    # undefined where no run moved (t = 0: theta^f; the eq. 13 mean leaves rounding residues)
    defined = moved & (tot_sq > 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = np.where(defined, signal / np.where(defined, tot_sq / K ** 2, 1.0), np.nan)
        snr = np.where(noise > 0, np.maximum(signal, 0.0) / np.where(noise > 0, noise, 1.0),
                       np.where(signal > 0, np.inf, 0.0))
    snr = np.where(defined, snr, np.nan)
    ceiling = np.sqrt(np.clip(ratio, 0.0, 1.0))
    points = np.arange(T) if eval_points is None else np.asarray(eval_points)
    if points.shape != (T,):
        raise ValueError(f"eval_points must have one entry per evaluation point ({T})")
    return NoiseCeiling(ceiling, snr, K, points)


def gold_noise_ceiling(result, adjust: str = "mean") -> NoiseCeiling:
    """:func:`noise_ceiling` of a :class:`fimoda.gold.GoldResult` (its arrays and evaluation
    points)."""
    return noise_ceiling(result.loss_full, result.loss_loo, adjust, result.eval_points)


def seeds_needed(ceiling, n_seeds, target):
    """How many seeds a gold standard needs for its noise ceiling to reach ``target``, given
    that it is ``ceiling`` with ``n_seeds`` seeds (scalars or arrays that broadcast): the
    one-seed signal-to-noise ratio R = c^2 / (K (1 - c^2)) (module docstring), then
    k = target^2 / ((1 - target^2) R) = K target^2 (1 - c^2) / ((1 - target^2) c^2): the
    Spearman-Brown extrapolation. Not rounded; 0 where the ceiling is 1, inf where it is 0, NaN
    where it is NaN (undefined). A ceiling outside [0, 1], ``n_seeds`` < 1 or a target outside
    (0, 1) is a ValueError."""
    c = np.asarray(ceiling, dtype=np.float64)
    k = np.asarray(n_seeds, dtype=np.float64)
    target = float(target)
    if not 0 < target < 1:
        raise ValueError(f"a target ceiling lies in (0, 1), got {target}")
    if np.any(~(k >= 1)):
        raise ValueError(f"the gold standard's number of seeds must be >= 1, got {n_seeds}")
    if np.any((c < 0) | (c > 1)):
        raise ValueError(f"a noise ceiling lies in [0, 1], got {ceiling}")
    t2, c2 = target * target, c * c
    with np.errstate(divide="ignore", invalid="ignore"):
        need = np.where(c2 > 0, k * t2 * (1 - c2) / ((1 - t2) * np.where(c2 > 0, c2, 1.0)),
                        np.inf)
    need = np.where(np.isnan(c), np.nan, need)
    return float(need) if need.ndim == 0 else need
