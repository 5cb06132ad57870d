"""What both of notebook 07's studies share: which datasets they run on, their inputs (theta^f,
the left-out and test instances of notebooks 01-02), and the cosine between two gold arrays."""
from __future__ import annotations

import numpy as np

from .. import experiment as ex


def full_hessian_applies(cfg) -> tuple[bool, str]:
    """(whether the parts of notebook 07 that need per-instance tangents or true-Hessian series
    run -- part 1, the infinitesimal gold standard, and part 2's true-Hessian curves -- the
    reason when they do not): MLPs only."""
    if cfg.model != "mlp":
        return False, (f"{cfg.dataset}: part 1 (the infinitesimal gold standard) and the "
                       f"true-Hessian curves of part 2 are skipped. The infinitesimal gold "
                       f"standard carries one tangent per left-out instance through every step "
                       f"(a jvp costs about three gradients per instance: the {cfg.model} model on 2 CPU "
                       f"cores would take longer than notebook 02 itself), and the trajectory "
                       f"series on the {cfg.model} model's true Hessian needs true-Hessian products "
                       f"per test point at every step, which the paper did not run on these "
                       f"models either. Part 2 runs on the Gauss-Newton Hessian.")
    return True, ""


def applies(cfg) -> tuple[bool, str]:
    """(whether notebook 07 runs for this dataset, what it leaves out and why): part 2 (the
    trajectory study, Gauss-Newton) runs for every model; :func:`full_hessian_applies` says
    what else."""
    return True, full_hessian_applies(cfg)[1]


def study_inputs(cfg, device):
    """(theta^f, its training data, the left-out rows, the test rows) of ``cfg``, as the
    experiment's notebooks select them."""
    model, ds = ex.final_model(cfg, device)
    loo = ex.select_loo_indices(cfg, len(ds.X_train))
    test = ex.select_test_indices(cfg, len(ds.X_test))
    return model, ds, loo, test


def gold_cosine(a: np.ndarray, b: np.ndarray):
    """Cosine between two gold score arrays a[i, t, j], b[i, t, j] over the left-out set, per
    test point: (mean, se) over test points at every t."""
    from ...metrics import cosine, mean_se
    per = np.stack([cosine(a[:, t:t + 1], b[:, t].T)[0] for t in range(a.shape[1])])
    return mean_se(per, axis=1)
