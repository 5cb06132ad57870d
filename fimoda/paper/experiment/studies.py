"""The paper's studies beyond the main curves: how many seeds the gold standard needs (App. E.1),
how the methods compare with LOO re-training from scratch (Fig. 11), and mislabelled-example
detection (App. E.2)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ... import store
from ...settings import ExperimentConfig
from ...io import load_npz
from .gold_runs import gold_settings
from .records import config_without
from .methods import make_attributor
from .setup import final_model, out_dir, select_loo_indices, select_test_indices, tensors


def seed_reliability(loss_full, loss_loo, adjust: str = "mean"):
    """[(k, mean cosine between the gold scores of two disjoint groups of k seeds)] at the
    last eval point, for k = 1, 2, 4, ... up to half the seeds."""
    from ...gold import seed_group_scores
    S = loss_full.shape[0]
    rows, k = [], 1
    while 2 * k <= S:
        g = seed_group_scores(loss_full, loss_loo, k, adjust=adjust)[:, :, -1, :]  # (G, i, j)
        num = (g[0] * g[1]).sum(0)
        den = np.linalg.norm(g[0], axis=0) * np.linalg.norm(g[1], axis=0)
        rows.append((k, float(np.mean(np.where(den > 0, num / np.where(den > 0, den, 1), 0)))))
        k *= 2
    return rows


def seeds_study(gold: dict, scores: dict, adjust: str = "mean", metric: str = "cosine"):
    """Max over eval points of the mean metric vs the number k of seeds averaged (App. E.1):
    returns (ks, {method: (means, ses)})."""
    from ...gold import seed_group_scores
    from ...metrics import peak_over_eval_points
    S = gold["loss_full"].shape[0]
    ks = [k for k in (1, 2, 4, 8, 16, 32, 64, 100) if k <= S]
    if S not in ks:
        ks.append(S)
    groups = {k: seed_group_scores(gold["loss_full"], gold["loss_loo"], k, adjust=adjust)
              for k in ks}
    out = {}
    for m, s in scores.items():
        vals = [peak_over_eval_points(groups[k], s, metric)[:2] for k in ks]
        out[m] = (np.array([v[0] for v in vals]), np.array([v[1] for v in vals]))
    return ks, out


def retrain_comparison(cfg: ExperimentConfig, scores: dict, directory=None):
    """Cosine (mean, se over test points) between each method's scores and the scores of LOO
    re-training from scratch (eq. 17 after the final epoch, paper Fig. 11); None when notebook 02
    has not been run with ``retrain=True``."""
    import pandas as pd
    from ...gold import gold_scores
    from ...metrics import cosine, mean_se
    from ...style import label
    p = Path(directory or out_dir(cfg)) / "retrain_remove.npz"
    if not p.exists():
        return None
    store.check(p, {"experiment": config_without(cfg, "methods")},
                f"notebooks/02_gold_further_training for {cfg.dataset} with retrain=True")
    z = load_npz(p)
    a = gold_scores(z["loss_full"], z["loss_loo"], adjust="full")[:, -1:, :]
    rows = {}
    for m, s in scores.items():
        mean, se = mean_se(cosine(a, s)[0])
        rows[label(m)] = {"cosine to re-training": float(mean), "se": float(se)}
    return pd.DataFrame(rows).T.sort_values("cosine to re-training", ascending=False)


def mislabel_applies(cfg: ExperimentConfig) -> tuple[bool, str]:
    """(whether notebook 06 runs mislabelled-example detection for ``cfg``, why not)."""
    if cfg.task != "classification":
        return False, "mislabelled-example detection applies to the classification datasets"
    if cfg.model == "resnet9":
        return False, ("the paper ran mislabelled-example detection on the tabular classifiers "
                       "and SST-2, not on images")
    if cfg.further.mislabel_skip:
        return False, f"not run in the {cfg.profile} profile: {cfg.further.mislabel_skip}"
    return True, ""


def mislabel_detection(cfg: ExperimentConfig, optimizer: Optional[str] = None,
                       mechanism: Optional[str] = None, device="cpu", trials=None, frac: float = 0.2,
                       directory=None):
    """Mislabelled-example detection (App. E.2): flip the labels of a random ``frac`` of the
    left-out set, further train theta^f for one epoch on the flipped data (all seeds), and take
    the AUC-ROC of minus the test-averaged gold score (eq. 13) for the flipped indicator; the
    same with Grad-Dot on the flipped labels. Mean and standard error over ``trials``."""
    import pandas as pd
    from ...gold import GoldConfig, further_train, gold_scores
    from ...influence import Attributor, compute_scores
    from ...metrics import mean_se, roc_auc
    if cfg.task != "classification":
        raise ValueError("mislabelled-example detection needs a classification dataset")
    trials = trials or cfg.further.mislabel_trials
    optimizer, mechanism = gold_settings(cfg, optimizer, mechanism)
    d = Path(directory or out_dir(cfg))
    model, ds = final_model(cfg, device=device, directory=d)
    loo_idx = select_loo_indices(cfg, len(ds.X_train))
    test_idx = select_test_indices(cfg, len(ds.X_test))
    gcfg = GoldConfig.from_experiment(cfg.further, optimizer=optimizer, mechanism=mechanism,
                                      device=device, epochs=1, max_steps=cfg.further.max_steps,
                                      seeds=cfg.further.mislabel_seeds or cfg.further.seeds)
    # theta^f and the clean data, shared by every trial; a trial only changes labels
    base = make_attributor(model, ds, cfg, loo_idx, test_idx, device=device, progress=False)
    Xtr, ytr, _, _ = tensors(ds, cfg, device)     # the whole training set (not fit_rows)
    loo = torch.as_tensor(loo_idx)
    aucs = {"further training (gold)": [], "Grad-Dot": []}
    for trial in range(trials):
        rng = np.random.RandomState(1000 + trial)
        flip = np.sort(rng.choice(len(loo_idx), int(round(frac * len(loo_idx))), replace=False))
        y = ytr.clone()
        src = torch.as_tensor(loo_idx[flip])
        y[src] = (y[src] + torch.as_tensor(rng.randint(1, ds.n_classes, len(flip)))) % ds.n_classes
        res = further_train(model, cfg.task, Xtr, y, base.X_test, base.Y_test, loo,
                            gcfg, workdir=d / f"work_mislabel_{trial}")
        a = gold_scores(res.loss_full, res.loss_loo, adjust="mean")[:, -1, :].mean(1)
        is_flipped = np.zeros(len(loo_idx), bool)
        is_flipped[flip] = True
        aucs["further training (gold)"].append(roc_auc(-a, is_flipped))
        flipped = Attributor(base.problem, base.X_loo, y[loo], base.X_test, base.Y_test)
        gd = compute_scores("grad_dot", flipped).mean(0)
        aucs["Grad-Dot"].append(roc_auc(-gd, is_flipped))
    out = {k: mean_se(np.array(v)) for k, v in aucs.items()}
    return pd.DataFrame({k: {"AUC mean": m, "se": s, "trials": trials} for k, (m, s) in out.items()}).T
