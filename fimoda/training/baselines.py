"""The trivial predictor every final model theta^f must clearly beat, and the check.

Attribution scores of a model that learned nothing (a classifier that predicts the majority class
for every row, a regressor near the mean) describe no learning, so every number downstream of it
would be meaningless. The trivial predictor is fitted on the rows theta^f was trained on and scored
on the test rows theta^f's record scores:

- classification: the majority class of the training rows (its test accuracy is the *majority
  rate*) and the class-prior predictor p_k = n_k / n (its test cross-entropy
  -(1/m) sum_j log p_{y_j}, in nats per row like the model's loss);
- regression: the mean of the training targets (its test MSE (1/m) sum_j (y_j - ybar)^2, in the
  squared units of y).

How clearly theta^f must beat it is :class:`BaselineMargin` (:data:`FINAL_MODEL_MARGIN` for every
profile and dataset). :func:`baseline_check`
compares a model's test metrics with it; :func:`require_beaten` raises :class:`TrivialModelError`
when a criterion fails; :func:`baseline_table` shows the comparison (notebook 01).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = ["BaselineMargin", "FINAL_MODEL_MARGIN", "TrivialModelError", "trivial_baseline",
           "baseline_check", "require_beaten", "baseline_table"]


@dataclass(frozen=True)
class BaselineMargin:
    """How clearly every final model theta^f must beat its trivial predictor on the test rows:
    the same margin in every profile and for every dataset.
    :func:`fimoda.training.train_final_model` refuses to save, and ``load_final_model`` to load,
    a model that does not clear it."""
    # classification: test error rate (1 - accuracy) at most this times the majority class's
    # (1 - majority rate), i.e. right on at least a fifth of the rows the majority class gets wrong
    error_ratio: float = 0.8
    # classification: test cross-entropy (nats per row) at most this times the class-prior
    # predictor's (class frequencies of the training rows)
    cross_entropy_ratio: float = 0.95
    # regression: test MSE at most this times that of the training rows' mean (R^2 measured
    # against the training mean at least 1 - mse_ratio)
    mse_ratio: float = 0.5

    def __post_init__(self):
        for name in ("error_ratio", "cross_entropy_ratio", "mse_ratio"):
            v = getattr(self, name)
            if not 0 < v <= 1:
                raise ValueError(f"BaselineMargin.{name} must lie in (0, 1], got {v}")


# The margin applied to every final model (the default of train_final_model/load_final_model)
FINAL_MODEL_MARGIN = BaselineMargin()


class TrivialModelError(ValueError):
    """A final model does not beat its trivial predictor by the margin (nothing is saved)."""


def trivial_baseline(task: str, y_train, y_test, n_classes: int | None = None) -> dict:
    """The trivial predictor fitted on ``y_train`` and its metrics on ``y_test`` (module
    docstring). Classification: ``majority_class``, ``majority_rate`` (test accuracy),
    ``prior_cross_entropy`` (nats per row; inf when a test class never occurs in training).
    Regression: ``mean`` and ``mse`` (squared units of y)."""
    y_train, y_test = np.asarray(y_train), np.asarray(y_test)
    if y_train.ndim != 1 or y_test.ndim != 1 or not len(y_train) or not len(y_test):
        raise ValueError(f"y_train and y_test must be non-empty 1-d arrays, got shapes "
                         f"{y_train.shape} and {y_test.shape}")
    if task == "regression":
        mean = float(y_train.astype(np.float64).mean())
        return {"mean": mean, "mse": float(((y_test.astype(np.float64) - mean) ** 2).mean())}
    if task != "classification":
        raise ValueError(f"unknown task {task!r}; choose from ('classification', 'regression')")
    k = int(max(y_train.max(), y_test.max()) + 1 if n_classes is None else n_classes)
    counts = np.bincount(y_train.astype(np.int64), minlength=k)
    prior = counts / counts.sum()
    majority = int(counts.argmax())                     # ties: the smallest class index
    with np.errstate(divide="ignore"):
        nll = -np.log(prior[y_test.astype(np.int64)])   # inf where the prior is 0
    return {"majority_class": majority, "majority_rate": float((y_test == majority).mean()),
            "prior_cross_entropy": float(nll.mean())}


def baseline_check(task: str, test_metrics: dict, baseline: dict,
                   margin: BaselineMargin) -> dict:
    """Each criterion of ``margin`` for a model whose test metrics (as
    :func:`fimoda.training.loop.evaluate` gives them) are ``test_metrics``, against ``baseline``
    (:func:`trivial_baseline` on the same test rows). Returns ``{"passed", "n_test", "criteria":
    [{"metric", "model", "trivial", "bound", "rule", "passed"}, ...]}``, where ``bound`` is the
    value the model's metric must reach (accuracy: at least; losses: at most)."""
    crit = []
    if task == "classification":
        maj = baseline["majority_rate"]
        acc_bound = 1.0 - margin.error_ratio * (1.0 - maj)
        crit.append(dict(metric="test accuracy", model=test_metrics["accuracy"], trivial=maj,
                         bound=acc_bound, passed=test_metrics["accuracy"] >= acc_bound,
                         rule=f">= 1 - {margin.error_ratio} x (1 - majority rate)"))
        prior = baseline["prior_cross_entropy"]
        ce_bound = margin.cross_entropy_ratio * prior
        crit.append(dict(metric="test cross-entropy (nats)", model=test_metrics["loss"],
                         trivial=prior, bound=ce_bound, passed=test_metrics["loss"] <= ce_bound,
                         rule=f"<= {margin.cross_entropy_ratio} x the class prior's"))
    elif task == "regression":
        mse = test_metrics["rmse"] ** 2
        bound = margin.mse_ratio * baseline["mse"]
        crit.append(dict(metric="test MSE", model=mse, trivial=baseline["mse"], bound=bound,
                         passed=mse <= bound, rule=f"<= {margin.mse_ratio} x the training mean's"))
    else:
        raise ValueError(f"unknown task {task!r}; choose from ('classification', 'regression')")
    for c in crit:                      # a NaN metric fails every comparison: never passes
        c["passed"] = bool(c["passed"]) and not math.isnan(c["model"])
    return {"passed": all(c["passed"] for c in crit), "n_test": int(test_metrics["n"]),
            "criteria": crit}


def require_beaten(check: dict, what: str) -> None:
    """:class:`TrivialModelError` giving every failed criterion's numbers when ``check`` (from
    :func:`baseline_check`) did not pass; ``what`` names the model and what was refused."""
    if check["passed"]:
        return
    failed = "; ".join(f"{c['metric']} {c['model']:.4g} vs the trivial predictor's "
                       f"{c['trivial']:.4g}, needs {c['rule']} = {c['bound']:.4g}"
                       for c in check["criteria"] if not c["passed"])
    raise TrivialModelError(
        f"{what}: it does not beat its trivial predictor on {check['n_test']} test rows "
        f"({failed}). A model that has not learned makes every attribution of it meaningless; "
        f"train it longer or with a larger learning rate (cfg.train) and check its inputs")


def baseline_table(record: dict):
    """The final model's test metrics beside its trivial predictor's and the bound of the
    margin, one row per criterion (a pandas DataFrame), from a record of
    :func:`fimoda.training.train_final_model`."""
    import pandas as pd
    check = record["baseline"]
    rows = [{"metric": c["metric"], "final model": c["model"], "trivial predictor": c["trivial"],
             "required": f"{c['rule']} = {c['bound']:.4g}", "passed": c["passed"]}
            for c in check["criteria"]]
    return pd.DataFrame(rows).set_index("metric")
