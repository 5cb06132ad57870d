"""Part 1 of notebook 07: the exact infinitesimal gold standard (:mod:`fimoda.gold.infinitesimal`)
against the finite ``subtract`` gold standard on identical work, in float64 and float32, and
against notebook 02's gold standard."""
from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Optional

import numpy as np

from .. import experiment as ex
from ... import store
from ..experiment.records import config_without
from ...io import load_json, load_npz, save_json, save_npz, sha256_arrays
from .common import study_inputs, full_hessian_applies, gold_cosine

# The infinitesimal gold standard costs a jvp per left-out instance per step (about 3 gradients'
# work each, benchmarks/infinitesimal_speed.py): the cpu profile runs it on a slice of notebook
# 02's work (printed); smoke and paper on all of it. None: as notebook 02.
INFINITESIMAL_WORK = {
    "smoke": dict(seeds=None, n_loo=None, epochs=None),
    "cpu": dict(seeds=1, n_loo=10, epochs=None, max_steps=300),
    "paper": dict(seeds=None, n_loo=None, epochs=None),
}
# the datasets a profile runs the infinitesimal study on (None: every tabular one); the cpu
# profile keeps to two, a regression and a classification set
INFINITESIMAL_DATASETS = {"cpu": ("concrete", "fico")}


def infinitesimal_applies(cfg, enabled: bool = True) -> tuple[bool, str]:
    """(whether notebook 07 runs the infinitesimal study for this dataset, why not);
    ``enabled=False``: the notebook's parameter turned it off (the pipeline's Adam run)."""
    runs, why = full_hessian_applies(cfg)
    if runs and not enabled:
        return False, ("part 1 is off in this run (infinitesimal=False: the pipeline's Adam run "
                       "of this notebook computes part 2 only)")
    only = INFINITESIMAL_DATASETS.get(cfg.profile)
    if runs and only is not None and cfg.dataset not in only:
        return False, (f"the infinitesimal study runs on {' and '.join(only)} in the "
                       f"{cfg.profile} profile (its budget); run this notebook with "
                       f"profile='paper' for {cfg.dataset}")
    return runs, why


def _gold_config(cfg, optimizer, work: dict, device: str):
    from ...gold import GoldConfig
    opt, _ = ex.gold_settings(cfg, optimizer)
    over = {}
    if opt == "adam" and cfg.further.adam_epochs is not None:
        over["epochs"] = cfg.further.adam_epochs
    if work.get("epochs") is not None:
        over["epochs"] = work["epochs"]
    seeds = cfg.further.seeds if work.get("seeds") is None else work["seeds"]
    return GoldConfig.from_experiment(cfg.further, optimizer=opt, mechanism="subtract",
                                      seeds=seeds, device=device, progress=True, **over)


def work_plan(cfg, n_train: int, seeds=None, n_loo=None, epochs=None) -> dict:
    """The slice of notebook 02's work the infinitesimal study runs on (profile default, then the
    arguments): seeds (the first of notebook 02's), left-out instances (the first ``n_loo``),
    epochs (the profile may cap the run at ``max_steps`` SGD steps, in whole epochs)."""
    import math
    w = dict(INFINITESIMAL_WORK.get(cfg.profile, INFINITESIMAL_WORK["paper"]))
    for k, v in (("seeds", seeds), ("n_loo", n_loo), ("epochs", epochs)):
        if v is not None:
            if isinstance(v, bool) or not (isinstance(v, int) and v >= 1):
                raise ValueError(f"{k} must be an integer >= 1, got {v!r}")
            w[k] = v
    cap = w.pop("max_steps", None)
    if w["epochs"] is None and cap is not None:
        per_epoch = math.ceil(n_train / cfg.further.batch_size)
        w["epochs"] = max(1, min(cfg.further.epochs, cap // per_epoch))
    return w


def rel_error(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """||a - b|| / ||b|| per evaluation point (over left-out and test instances)."""
    num = np.linalg.norm((a - b).transpose(1, 0, 2).reshape(a.shape[1], -1), axis=1)
    den = np.linalg.norm(b.transpose(1, 0, 2).reshape(b.shape[1], -1), axis=1)
    return num / np.where(den > 0, den, 1.0)


def infinitesimal_study(cfg, optimizer: Optional[str] = None, device: str = "cpu",
                        seeds=None, n_loo=None, epochs=None, directory=None) -> dict:
    """The infinitesimal gold standard on the slice :func:`work_plan` of notebook 02's work, with
    the finite ``subtract`` gold standard on the identical work, each in float64 and float32.
    Returns the eval points, cosine curves {name: (mean, se)}, relative errors to the float64
    finite gold, seconds per computation and the work; cached in
    ``beyond_infinitesimal_<optimizer>.npz``."""
    import torch
    from ...gold import further_train, gold_scores
    from ...gold.infinitesimal import infinitesimal_further_train
    opt, _ = ex.gold_settings(cfg, optimizer)
    model, ds, loo, test = study_inputs(cfg, device)
    work = work_plan(cfg, len(ds.X_train), seeds, n_loo, epochs)
    d = Path(directory or ex.out_dir(cfg))
    path = d / f"beyond_infinitesimal_{opt}.npz"
    gcfg = _gold_config(cfg, opt, work, device)
    record = {"gold": gcfg.numeric(), "seeds": gcfg.seed_list, "work": work,
              "experiment": config_without(cfg, "methods")}
    loo = loo[: work["n_loo"]] if work["n_loo"] else loo
    inputs = {**record, **ex.final_model_source(d),
              "theta": sha256_arrays(*[v for _, v in sorted(model.state_dict().items())]),
              "data": sha256_arrays(ds.X_train, ds.y_train, ds.X_test, ds.y_test),
              "loo_indices": np.asarray(loo).tolist(), "test_indices": np.asarray(test).tolist()}

    def compute():
        Xtr, ytr, Xte, yte = ex.tensors(ds, cfg, device)
        t = torch.as_tensor(test)
        args = (cfg.task, Xtr, ytr, Xte[t], yte[t], loo)
        arrays, seconds = {}, {}
        for label, dt in (("64", torch.float64), ("32", torch.float32)):
            m = copy.deepcopy(model).to(dt)
            conv = [a.to(dt) if a.is_floating_point() else a for a in args[1:5]]
            a32 = (args[0], *conv, loo)
            t0 = time.perf_counter()
            inf = infinitesimal_further_train(m, *a32, gcfg)
            seconds[f"infinitesimal{label}"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            fin = further_train(m, *a32, gcfg)
            seconds[f"finite{label}"] = time.perf_counter() - t0
            arrays[f"inf{label}"] = gold_scores(inf.loss_full, inf.loss_loo)
            arrays[f"fin{label}"] = gold_scores(fin.loss_full, fin.loss_loo)
            arrays[f"tangent{label}"] = inf.tangent_norm
            arrays[f"dist{label}"] = inf.param_dist
        save_npz(path, eval_points=inf.eval_points, loo_indices=loo, test_indices=test,
                 **arrays)
        save_json(path.with_suffix(".json"), {"record": record, "seconds": seconds})

    z = store.cached(path, inputs, compute, load_npz, device=device,
                     files=[path.with_suffix(".json")],
                     what=f"notebook 07's infinitesimal study of {cfg.dataset} ({opt})")
    ep = np.asarray(z["eval_points"])
    sl = slice(1, None) if ep[0] == 0 and len(ep) > 1 else slice(None)
    A = {k: np.asarray(z[k])[:, sl] for k in ("inf64", "fin64", "inf32", "fin32")}
    curves = {"infinitesimal vs finite (float64)": gold_cosine(A["inf64"], A["fin64"]),
              "finite float32 vs finite float64": gold_cosine(A["fin32"], A["fin64"]),
              "infinitesimal float32 vs finite float64": gold_cosine(A["inf32"], A["fin64"]),
              "infinitesimal float32 vs float64": gold_cosine(A["inf32"], A["inf64"])}
    errors = {"finite float32": rel_error(A["fin32"], A["fin64"]),
              "infinitesimal float32": rel_error(A["inf32"], A["inf64"]),
              "infinitesimal float64 (vs finite float64)": rel_error(A["inf64"], A["fin64"])}
    # notebook 02's gold standard on the same slice (its own mechanism; subset's own mean, eq. 13)
    try:
        g = ex.load_gold(cfg, opt)
        pos = np.searchsorted(np.asarray(g["loo_indices"]), np.asarray(z["loo_indices"]))
        seeds_idx = np.nonzero(np.isin(np.asarray(g["seeds"]),
                                       np.asarray(load_json(path.with_suffix(".json"))
                                                  ["record"]["seeds"])))[0]
        T = A["inf64"].shape[1]
        a02 = gold_scores(np.asarray(g["loss_full"])[seeds_idx],
                          np.asarray(g["loss_loo"])[seeds_idx][:, pos])[:, sl][:, :T]
        mech = ex.gold_settings(cfg, opt)[1]
        curves[f"infinitesimal vs notebook 02 ({mech})"] = gold_cosine(A["inf64"], a02)
        curves[f"finite subtract vs notebook 02 ({mech})"] = gold_cosine(A["fin64"], a02)
    except FileNotFoundError:
        pass
    seconds = load_json(path.with_suffix(".json"))["seconds"]
    return {"eval_points": ep[sl], "curves": curves, "errors": errors, "seconds": seconds,
            "work": work, "n_loo": len(z["loo_indices"]), "tangent_norm": np.asarray(z["tangent64"]),
            "param_dist": np.asarray(z["dist64"]), "optimizer": opt}


def infinitesimal_table(study: dict):
    """(cosines, errors): per comparison the cosine at the first, smallest (and where) and last
    evaluation point; per float32 computation its relative error at the first and last."""
    import pandas as pd
    t = study["eval_points"]
    rows = []
    for name, (mean, se) in study["curves"].items():
        k = int(np.argmin(mean))
        rows.append({"comparison": name, "cos first": mean[0], "cos min": mean[k],
                     "min at": int(t[k]), "cos last": mean[-1]})
    err = [{"relative error": name, "first": e[0], "max": float(np.max(e)), "last": e[-1]}
           for name, e in study["errors"].items()]
    return (pd.DataFrame(rows).set_index("comparison"),
            pd.DataFrame(err).set_index("relative error"))


def infinitesimal_figure(study: dict, title: str, unit: str = "epochs"):
    """Left: the cosine of each comparison over further training (mean +- 1 SE over test
    points); right: the relative error of each float32 computation. Comparisons are not
    methods: they take the theme's colour and line-style cycle (:func:`fimoda.style.theme`)."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator
    from ...style import theme
    with theme():
        fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
        t = study["eval_points"]
        for name, (mean, se) in study["curves"].items():
            line, = axes[0].plot(t, mean, label=name, lw=1.6)
            axes[0].fill_between(t, mean - se, mean + se, color=line.get_color(), alpha=0.18,
                                 lw=0)
        axes[0].set_ylabel("cosine (mean over test points)")
        axes[0].set_xlabel(f"further training ({unit})")
        axes[0].legend(fontsize="x-small")
        axes[0].set_title(title)
        for name, e in study["errors"].items():
            axes[1].semilogy(t, np.maximum(e, 1e-17), label=name, lw=1.6)
        axes[1].set_ylabel("relative error of the gold scores")
        axes[1].set_xlabel(f"further training ({unit})")
        axes[1].legend(fontsize="x-small")
        for ax in axes:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))     # epochs or steps
        fig.tight_layout()
    return fig


# ----------------------------------------------------------------------------- trajectory
