"""What both of notebook 07's studies share: which datasets they run on, their inputs (theta^f,
the left-out and test instances of notebooks 01-02), and the cosine between two gold arrays."""
from __future__ import annotations

import numpy as np

from .. import experiment as ex


def applies(cfg) -> tuple[bool, str]:
    """(whether notebook 07 runs for this dataset, the reason when it does not)."""
    if cfg.model != "mlp":
        return False, (f"{cfg.dataset}: skipped. The infinitesimal gold standard carries one "
                       f"tangent per left-out instance through every step (a jvp costs about "
                       f"three gradients per instance: {cfg.model} on 2 CPU cores would take "
                       f"longer than notebook 02 itself), and the trajectory method's series on "
                       f"the {cfg.model}'s true Hessian needs full-batch Hessian products that "
                       f"the paper did not run on these models either.")
    return True, ""


def _inputs(cfg, device):
    model, ds = ex.final_model(cfg, device)
    loo = ex.select_loo_indices(cfg, len(ds.X_train))
    test = ex.select_test_indices(cfg, len(ds.X_test))
    return model, ds, loo, test


def gold_cosine(a: np.ndarray, b: np.ndarray):
    """Cosine between two gold score arrays a[i, t, j], b[i, t, j] over the left-out set, per
    test point: (mean, se) over test points at every t."""
    from ..metrics import cosine, mean_se
    per = np.stack([cosine(a[:, t:t + 1], b[:, t].T)[0] for t in range(a.shape[1])])
    return mean_se(per, axis=1)
