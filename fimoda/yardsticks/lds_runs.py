"""The models behind a linear datamodeling score (:func:`fimoda.metrics.lds`), two ways, each as
one vectorised group run of the gold engine:

- further-training LDS (:func:`further_training_lds`), the final-model-only counterpart: M random
  subsets of the left-out set L, each of alpha |L| instances; for subset K_m the group run
  further-trains theta^f without S_m = L \\ K_m (every instance outside L stays in), with the
  gold standard's algorithm, seeds and mechanism;
- classic LDS (:func:`retraining_lds`, Park et al. 2023): M random subsets of the whole training
  set, each of alpha n instances, re-trained from theta^0 with the final model's own recipe
  (:func:`fimoda.gold.retrain_loo` leaving out S_m = D \\ K_m).

Either returns :class:`LDSRuns`: the subsets (the instances kept, as the LDS takes them) and the
measured output per subset, test point and evaluation point -- the change in test loss,
mean_s (loss_{-S_m} - loss_full), the group's own gold -- ready for ``runs.lds(scores)``. The
subsets are drawn by ``numpy.random.default_rng(seed)``: the same seed, the same subsets.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from ..gold.config import GoldConfig, GoldResult
from ..gold.scores import gold_scores
from ..metrics import LDS, lds

__all__ = ["LDSRuns", "draw_subsets", "further_training_lds", "retraining_lds"]


@dataclass
class LDSRuns:
    """``subsets`` (M, k): the columns each model kept (positions in ``left_out`` for the
    further-training LDS, training indices for the classic one); ``outputs`` (M, T, J): the
    change in test loss of model m at evaluation point t and test point j, mean over seeds of
    loss_{-S_m} - loss_full; ``eval_points`` (T,); ``gold``: the group runs themselves. A
    model whose training diverged (the re-training LDS keeps it, ``diverged="keep"``) has
    non-finite outputs and is left out of :meth:`lds`; :attr:`diverged` counts them."""
    subsets: np.ndarray
    outputs: np.ndarray
    eval_points: np.ndarray
    gold: GoldResult

    @property
    def finite(self) -> np.ndarray:
        """(M,) bool: the models whose outputs are finite at every point (did not diverge)."""
        return np.isfinite(self.outputs).all(axis=tuple(range(1, self.outputs.ndim)))

    @property
    def diverged(self) -> int:
        """How many models diverged (left out of :meth:`lds`)."""
        return int((~self.finite).sum())

    def lds(self, scores, t: int = -1) -> LDS:
        """The LDS of ``scores[test, column]`` (fimoda's layout and sign) against the models at
        evaluation point index ``t`` (default the last), over the models that did not diverge
        (at least 3: a ValueError otherwise)."""
        ok = self.finite
        if ok.sum() < 3:
            raise ValueError(f"{self.diverged} of {len(ok)} models diverged: an LDS needs at "
                             f"least 3 (lower the learning rate)")
        return lds(scores, self.subsets[ok], self.outputs[ok, t], target="loss")


def draw_subsets(n_pool: int, n_subsets: int, alpha: float = 0.5, seed: int = 0) -> np.ndarray:
    """(n_subsets, round(alpha n_pool)) int64: random subsets of range(n_pool) without
    replacement within a subset, each row sorted; subsets may coincide."""
    if not (isinstance(n_subsets, (int, np.integer)) and n_subsets >= 3):
        raise ValueError(f"n_subsets must be an integer >= 3 (a rank correlation across "
                         f"subsets), got {n_subsets!r}")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha (the fraction kept) must lie in (0, 1), got {alpha!r}")
    k = int(round(alpha * n_pool))
    if not 1 <= k <= n_pool - 1:
        raise ValueError(f"alpha = {alpha} keeps {k} of {n_pool}: a subset must keep at least one "
                         "instance and leave out at least one")
    rng = np.random.default_rng(seed)
    return np.stack([np.sort(rng.choice(n_pool, k, replace=False)) for _ in range(n_subsets)])


def _runs(result: GoldResult, kept: np.ndarray) -> LDSRuns:
    change = gold_scores(result.loss_full, result.loss_loo, adjust="full")    # (M, T, J)
    return LDSRuns(kept, change, np.asarray(result.eval_points), result)


def _left_out_groups(pool: np.ndarray, kept: np.ndarray) -> list:
    n_pool = len(pool)
    mask = np.ones((len(kept), n_pool), dtype=bool)
    np.put_along_axis(mask, kept, False, axis=1)
    return [pool[row] for row in mask]


def further_training_lds(model, task: str, X_train, y_train, X_test, y_test, left_out,
                         cfg: GoldConfig, n_subsets: int = 50, alpha: float = 0.5, seed: int = 0,
                         workdir=None, **further) -> LDSRuns:
    """The further-training LDS's models: ``n_subsets`` random subsets K_m of ``left_out`` (L,
    training indices) of alpha |L| instances each, and for each the group further training of
    :func:`fimoda.gold.further_train` from ``model`` (theta^f) under ``cfg`` without
    L \\ K_m. ``subsets`` are positions in ``left_out``, the columns of a method's
    ``scores[test, i]`` for ``left_out[i]``. ``workdir`` and ``further`` (augment, loss, ...)
    as for :func:`fimoda.gold.further_train`."""
    from ..gold.groups import as_left_out
    from ..gold.runner import further_train
    pool = np.asarray(left_out.cpu() if hasattr(left_out, "cpu") else left_out)
    if pool.ndim != 1:
        raise ValueError("left_out must be the 1-D set L of training indices the subsets are "
                         "drawn from")
    pool = as_left_out(pool, len(X_train), "left_out")
    kept = draw_subsets(len(pool), n_subsets, alpha, seed)
    result = further_train(model, task, X_train, y_train, X_test, y_test,
                           _left_out_groups(pool, kept), cfg, workdir=workdir, **further)
    return _runs(result, kept)


def retraining_lds(model_init, cfg, X_train, y_train, X_test, y_test, n_subsets: int = 50,
                   alpha: float = 0.5, seed: int = 0, seeds: int = 1,
                   workdir=None, pool=None, **retrain) -> LDSRuns:
    """The classic LDS's models (Park et al. 2023): ``n_subsets`` random subsets K_m of the
    whole training set of alpha n instances each, every one re-trained from theta^0
    (``model_init``) with the final model's recipe ``cfg.train`` by
    :func:`fimoda.gold.retrain_loo` (``seeds`` re-training seeds; their mean is the output).
    A re-training that diverges (the recipe's learning rate on another subset of the data) is
    kept as non-finite and left out of the LDS (:attr:`LDSRuns.diverged`), not an error.
    ``subsets`` are training indices, the columns of scores over the whole training set.
    ``pool`` (1-D training indices, e.g. the left-out set L of scores over L only): draw K_m
    from ``pool`` instead, alpha |pool| each, every instance outside it in every model;
    ``subsets`` are then positions in ``pool``, as for :func:`further_training_lds`."""
    from ..gold.reference import retrain_loo
    n = len(X_train)
    if pool is None:
        pool = np.arange(n)
    else:
        from ..gold.groups import as_left_out
        pool = np.asarray(pool.cpu() if hasattr(pool, "cpu") else pool)
        if pool.ndim != 1:
            raise ValueError("pool must be a 1-D set of training indices the subsets are drawn "
                             "from")
        pool = as_left_out(pool, n, "pool")
    kept = draw_subsets(len(pool), n_subsets, alpha, seed)
    result = retrain_loo(model_init, cfg, X_train, y_train, X_test, y_test,
                         _left_out_groups(pool, kept), seeds=seeds, workdir=workdir,
                         **{"diverged": "keep", **retrain})
    return _runs(result, kept)
