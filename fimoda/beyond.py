"""Notebook 07, beyond the paper (issue 13): the two open questions of the paper's §7, answered
with what fimoda already computes.

1. :func:`infinitesimal_study` -- the exact infinitesimal gold standard
   (:mod:`fimoda.gold.infinitesimal`) against the finite ``subtract`` gold standard on identical
   work (same seeds, batch orders, left-out and test instances, evaluation points), in float64 and
   float32, and against notebook 02's gold standard.
2. :func:`trajectory_study` -- the trajectory-matched influence
   (:mod:`fimoda.influence.trajectory`; Gauss-Newton and true Hessian) and the damping schedule
   lambda(t) = 1/(eta t), scored at every evaluation point of notebook 02's gold standard, beside
   the paper's methods of notebook 03 (Figure-2 style).

Every result is cached next to the dataset's others (``results/<profile>/<dataset>/beyond_*``) and
tabulated for ``results/<profile>/summary.md`` (:func:`fimoda.report.beyond_rows`).
"""
from __future__ import annotations

import copy
import dataclasses
import json
import time
from pathlib import Path
from typing import Optional

import numpy as np

from . import experiment as ex
from .experiment.records import _canon, _without   # the key a cached result is stored with
from .io import load_json, load_npz, save_json, save_npz

# The infinitesimal gold standard costs a jvp per left-out instance per step (about 3 gradients'
# work each, benchmarks/infinitesimal_speed.py): the cpu profile runs it on a slice of notebook
# 02's work (printed); smoke and paper on all of it. None: as notebook 02.
INFINITESIMAL_WORK = {
    "smoke": dict(seeds=None, n_loo=None, epochs=None),
    "cpu": dict(seeds=1, n_loo=10, epochs=None, max_steps=300),
    "paper": dict(seeds=None, n_loo=None, epochs=None),
}
# the datasets a profile runs the infinitesimal study on (None: every tabular one); the cpu
# profile keeps to the two the issue asks for, a regression and a classification set
INFINITESIMAL_DATASETS = {"cpu": ("concrete", "fico")}
# the paper's methods drawn beside the trajectory curves (those notebook 03 computed)
PAPER_SIDE = ("grad_dot", "grad_cos", "datainf", "cg", "lissa", "lissa_h", "trak", "ekfac")


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


def infinitesimal_applies(cfg) -> tuple[bool, str]:
    """(whether notebook 07 runs the infinitesimal study for this dataset, why not)."""
    runs, why = applies(cfg)
    only = INFINITESIMAL_DATASETS.get(cfg.profile)
    if runs and only is not None and cfg.dataset not in only:
        return False, (f"the infinitesimal study runs on {' and '.join(only)} in the "
                       f"{cfg.profile} profile (its budget); run this notebook with "
                       f"profile='paper' for {cfg.dataset}")
    return runs, why


def _gold_config(cfg, optimizer, work: dict, device: str):
    from .gold import GoldConfig
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


def _inputs(cfg, device):
    model, ds = ex.final_model(cfg, device)
    loo = ex.select_loo_indices(cfg, len(ds.X_train))
    test = ex.select_test_indices(cfg, len(ds.X_test))
    return model, ds, loo, test


def gold_cosine(a: np.ndarray, b: np.ndarray):
    """Cosine between two gold score arrays a[i, t, j], b[i, t, j] over the left-out set, per
    test point: (mean, se) over test points at every t."""
    from .metrics import cosine, mean_se
    per = np.stack([cosine(a[:, t:t + 1], b[:, t].T)[0] for t in range(a.shape[1])])
    return mean_se(per, axis=1)


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
    from .gold import further_train, gold_scores
    from .gold.infinitesimal import infinitesimal_further_train
    opt, _ = ex.gold_settings(cfg, optimizer)
    model, ds, loo, test = _inputs(cfg, device)
    work = work_plan(cfg, len(ds.X_train), seeds, n_loo, epochs)
    d = Path(directory or ex.out_dir(cfg))
    path = d / f"beyond_infinitesimal_{opt}.npz"
    gcfg = _gold_config(cfg, opt, work, device)
    record = {"gold": gcfg.numeric(), "seeds": gcfg.seed_list, "work": work,
              "experiment": _without(cfg, "methods")}
    if path.exists() and path.with_suffix(".json").exists() \
            and load_json(path.with_suffix(".json")).get("record") == json.loads(_canon(record)):
        z = load_npz(path)
    else:
        loo = loo[: work["n_loo"]] if work["n_loo"] else loo
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
        z = load_npz(path)
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
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    t = study["eval_points"]
    for name, (mean, se) in study["curves"].items():
        line, = axes[0].plot(t, mean, label=name, lw=1.5)
        axes[0].fill_between(t, mean - se, mean + se, color=line.get_color(), alpha=0.2, lw=0)
    axes[0].set_ylabel("cosine (mean over test points)")
    axes[0].set_xlabel(f"further training ({unit})")
    axes[0].legend(fontsize=7)
    axes[0].set_title(title)
    for name, e in study["errors"].items():
        axes[1].semilogy(t, np.maximum(e, 1e-17), label=name, lw=1.5)
    axes[1].set_ylabel("relative error of the gold scores")
    axes[1].set_xlabel(f"further training ({unit})")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------------------- trajectory
def trajectory_config(cfg, optimizer: Optional[str] = None, hessian: str = "gn"):
    """The :class:`fimoda.influence.trajectory.TrajectoryConfig` of the dataset's further
    training (lr of ``optimizer``'s gold standard, batch size, weight decay)."""
    from .gold import GoldConfig
    from .influence.trajectory import TrajectoryConfig
    opt, _ = ex.gold_settings(cfg, optimizer)
    g = GoldConfig.from_experiment(cfg.further, optimizer=opt)
    return TrajectoryConfig(lr=g.lr, batch_size=g.batch_size, weight_decay=g.weight_decay,
                            epochs=g.epochs, hessian=hessian, memory_gb=cfg.methods.memory_gb)


# Materialising the Gauss-Newton kernel costs n^2 P (its Gram matrix); the Krylov route through
# Gauss-Newton products costs ~3 n P per column per block, and LiSSA's cost model expects ~30
# blocks (fimoda.influence.solvers.lissa.KRYLOV_BLOCKS_EXPECTED): with k right-hand sides the
# kernel pays below n ~ 90 k rows (Concrete: 927 rows, kernel; FICO: 8,883 rows, products).
KERNEL_ROWS_PER_RHS = 90


def _kernel_costlier(cfg, k: int) -> bool:
    n = cfg.train.n_train_subset or len(ex.load_data(cfg).X_train)
    return n > KERNEL_ROWS_PER_RHS * k


def eval_steps(cfg, eval_points, n_train: int, batch_size: int) -> np.ndarray:
    """SGD steps at the gold standard's evaluation points: epochs x ceil(n/B), or the steps
    themselves where it evaluates every k steps."""
    import math
    e = np.asarray(eval_points, dtype=np.int64)
    return e * math.ceil(n_train / batch_size) if ex.eval_unit(cfg) == "epoch" else e


def curves_at_points(a: np.ndarray, per_point: np.ndarray):
    """Cosine of per-evaluation-point scores ``per_point[t, j, i]`` with the gold ``a[i, t, j]``
    at the same point t: (mean, se) over test points."""
    from .metrics import cosine, mean_se
    per = np.stack([cosine(a[:, t:t + 1], per_point[t])[0] for t in range(a.shape[1])])
    return mean_se(per, axis=1)


def trajectory_study(cfg, optimizer: Optional[str] = None, mechanism: Optional[str] = None,
                     device: str = "cpu", directory=None) -> dict:
    """Trajectory-matched influence (Gauss-Newton, true Hessian) and the damping schedule
    lambda(t) = 1/(eta t) at every evaluation point of notebook 02's gold standard, beside the
    paper's methods of notebook 03 (Grad-Dot and CG computed here if notebook 03 has not run).
    Per-point scores cached in ``beyond_trajectory_<optimizer>.npz``. Returns eval points,
    cosine curves {name: (mean, se)}, the smallest true-Hessian eigenvalue seen by the Krylov
    route, seconds."""
    from .influence import compute_scores
    from .influence.trajectory import (SpectralPairs, damping_schedule_curve,
                                       trajectory_curve)
    opt, mech = ex.gold_settings(cfg, optimizer, mechanism)
    d = Path(directory or ex.out_dir(cfg))
    gold = ex.load_gold(cfg, opt, mech, directory=d)
    a, t = ex.evaluation_gold(gold)
    tcfg = trajectory_config(cfg, opt)
    k = min(len(gold["loo_indices"]), len(gold["test_indices"]))
    if _kernel_costlier(cfg, k):
        tcfg = dataclasses.replace(tcfg, materialize="never")
    path = d / f"beyond_trajectory_{opt}.npz"
    record = {"trajectory": dataclasses.asdict(tcfg), "eval_points": t.tolist(),
              "experiment": _without(cfg, "further", "methods")}
    model, ds, loo, test = _inputs(cfg, device)
    if not (np.array_equal(loo, gold["loo_indices"]) and np.array_equal(test, gold["test_indices"])):
        raise ValueError("notebook 02's gold standard was computed for other instances: rerun it")
    if path.exists() and str(load_npz(path).get("config")) == _canon(record):
        z = load_npz(path)
        per = {k[4:]: z[k] for k in z if k.startswith("per_")}
        seconds, ritz_min = json.loads(str(z["seconds"])), float(z["ritz_min"])
    else:
        att = ex.make_attributor(model, ds, cfg, loo, test, device)
        steps = eval_steps(cfg, t, att.n_train, tcfg.batch_size)
        per, seconds = {}, {}
        t0 = time.perf_counter()
        gn = SpectralPairs(att, tcfg, int(steps.max()) - 1)
        per["trajectory"] = trajectory_curve(att, tcfg, steps, pairs=gn)
        per["schedule"] = damping_schedule_curve(att, tcfg, steps, pairs=gn)
        seconds["gauss-newton (trajectory + schedule)"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        htcfg = dataclasses.replace(tcfg, hessian="true")
        tr = SpectralPairs(att, htcfg, int(steps.max()) - 1)
        per["trajectory_h"] = trajectory_curve(att, htcfg, steps, pairs=tr)
        per["schedule_h"] = damping_schedule_curve(att, htcfg, steps, pairs=tr)
        seconds[f"true Hessian ({tr.blocks} Krylov blocks)"] = time.perf_counter() - t0
        ritz_min = float(tr.ritz.min())
        side = ex.load_scores(cfg, PAPER_SIDE, directory=d)
        for m in ("grad_dot", "cg"):
            if m not in side:
                side[m] = np.asarray(compute_scores(m, att, ex.method_config(m, cfg)))
        save_npz(path, **{f"per_{k}": v for k, v in per.items()},
                 **{f"side_{k}": v for k, v in side.items()}, config=np.asarray(_canon(record)),
                 seconds=np.asarray(json.dumps(seconds)), ritz_min=np.asarray(ritz_min))
        z = load_npz(path)
    side = {k[5:]: z[k] for k in z if k.startswith("side_")}
    side.update(ex.load_scores(cfg, PAPER_SIDE, directory=d))     # notebook 03's, if newer
    from .metrics import curve
    curves = {m: curve(a, side[m], "cosine") for m in PAPER_SIDE if m in side}
    for k in ("trajectory", "schedule", "trajectory_h", "schedule_h"):
        curves[k] = curves_at_points(a, per[k])
    return {"eval_points": t, "curves": curves, "seconds": seconds, "ritz_min": ritz_min,
            "optimizer": opt, "mechanism": mech, "lr": tcfg.lr, "n_train": len(ds.X_train)}


LABELS = {"trajectory": "trajectory (GN)", "trajectory_h": "trajectory (true H)",
          "schedule": "CG, λ(t)=1/(ηt) (GN)", "schedule_h": "λ(t)=1/(ηt) (true H)"}
STYLES = {"trajectory": ("k", "-", 2.4), "trajectory_h": ("tab:red", "-", 1.8),
          "schedule": ("k", ":", 2.0), "schedule_h": ("tab:red", ":", 1.5)}


def trajectory_table(study: dict):
    """Per method: cosine at the first point, max (and where), last; and, per evaluation point,
    whether the trajectory (GN) curve is at or above the best paper method there."""
    import pandas as pd
    from .plots import label
    t = study["eval_points"]
    rows = []
    for m, (mean, se) in study["curves"].items():
        k = int(np.argmax(mean))
        rows.append({"method": LABELS.get(m, label(m)), "cos first": mean[0], "cos max": mean[k],
                     "max at": int(t[k]), "cos last": mean[-1],
                     "cos mean over t": float(np.mean(mean))})
    return pd.DataFrame(rows).set_index("method")


def best_paper_gap(study: dict, method: str = "trajectory") -> dict:
    """At how many evaluation points ``method``'s mean cosine is at or above the best paper
    method's there, and the smallest margin (negative: below)."""
    paper = [study["curves"][m][0] for m in PAPER_SIDE if m in study["curves"]]
    if not paper:
        return {"points": 0, "at or above": 0, "min margin": np.nan}
    best = np.max(np.stack(paper), axis=0)
    margin = study["curves"][method][0] - best
    return {"points": len(margin), "at or above": int((margin >= 0).sum()),
            "min margin": float(margin.min()), "mean margin": float(margin.mean())}


def trajectory_figure(study: dict, title: str, unit: str = "epochs"):
    """Figure-2 style: the paper's methods (thin, their usual styles) and the trajectory-matched
    curves (thick)."""
    import matplotlib.pyplot as plt
    from .plots import STYLE, label
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    t = study["eval_points"]
    for m, (mean, se) in study["curves"].items():
        if m in LABELS:
            c, ls, lw = STYLES[m]
            ax.plot(t, mean, ls, color=c, lw=lw, label=LABELS[m])
            ax.fill_between(t, mean - se, mean + se, color=c, alpha=0.15, lw=0)
        else:
            ax.plot(t, mean, STYLE.get(m, "-"), lw=1.0, alpha=0.8, label=label(m))
    ax.axhline(0, color="k", lw=0.5)
    ax.set_xlabel(f"further training ({unit})")
    ax.set_ylabel("cosine similarity to the gold standard")
    ax.set_title(title)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return fig


def save_summary(cfg, inf: Optional[dict], traj: Optional[dict], directory=None) -> Path:
    """``beyond_summary.csv`` in the dataset's results: the numbers notebook 05 puts into
    ``summary.md`` (:func:`fimoda.report.beyond_rows`)."""
    import pandas as pd
    rows = []
    if inf is not None:
        for name, (mean, _) in inf["curves"].items():
            k = int(np.argmin(mean))
            rows.append({"part": "infinitesimal gold", "what": name, "first": mean[0],
                         "min": mean[k], "min at": int(inf["eval_points"][k]), "last": mean[-1]})
        for name, e in inf["errors"].items():
            rows.append({"part": "float32", "what": f"relative error, {name}", "first": e[0],
                         "min": float(np.min(e)), "min at": -1, "last": e[-1]})
    if traj is not None:
        from .plots import label
        for m, (mean, _) in traj["curves"].items():
            k = int(np.argmin(mean))
            rows.append({"part": "trajectory", "what": LABELS.get(m, label(m)), "first": mean[0],
                         "min": mean[k], "min at": int(traj["eval_points"][k]), "last": mean[-1],
                         "max": float(np.max(mean)), "mean": float(np.mean(mean))})
    path = Path(directory or ex.out_dir(cfg)) / "beyond_summary.csv"
    ex.save_table(pd.DataFrame(rows).set_index("part"), cfg, path.name, directory=path.parent)
    return path
