"""Part 2 of notebook 07: the trajectory-matched influence (:mod:`fimoda.influence.trajectory`;
Gauss-Newton and, for MLPs, true Hessian) and the damping schedule lambda(t) = 1/(eta t), scored
at every evaluation point of notebook 02's gold standard beside the paper's methods of notebook
03. Images and text: the Gauss-Newton curve only, by the series' recurrence where the
Gauss-Newton matrix does not materialise (:mod:`fimoda.influence.trajectory_recurrence`)."""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Optional

import numpy as np

from .. import experiment as ex
from ... import store
from ..experiment.records import config_without
from ...io import load_npz, save_npz, sha256_arrays
from ...influence.specs import paper_methods
from ...style import label            # the legend labels of notebook 07's curves live there
from .common import study_inputs

# the paper's methods drawn beside the trajectory curves (those notebook 03 computed): Figure 2's,
# Arnoldi, and the generalised influence functions (Prop. 1, Cor. 2, eq. 16; tabular only)
PAPER_SIDE = paper_methods()
# against the Adam gold standard, the trajectory with Adam's diagonal preconditioner too (D, the
# frozen state; D_eff, "adam_dv", measured no better: fimoda.influence.preconditioner)
ADAM_VARIANTS = ("adam",)


def trajectory_config(cfg, optimizer: Optional[str] = None, hessian: str = "gn",
                      preconditioner: str = "none"):
    """The :class:`fimoda.influence.trajectory.TrajectoryConfig` of the dataset's further
    training (lr and epochs of ``optimizer``'s gold standard: Adam's ``adam_lr`` and
    ``adam_epochs``; batch size, weight decay), with ``preconditioner`` ("adam": Adam's)."""
    from ...gold import GoldConfig
    from ...influence.trajectory import TrajectoryConfig
    opt, _ = ex.gold_settings(cfg, optimizer)
    g = GoldConfig.from_experiment(cfg.further, optimizer=opt)
    epochs = cfg.further.adam_epochs if opt == "adam" and cfg.further.adam_epochs else g.epochs
    return TrajectoryConfig(lr=g.lr, batch_size=g.batch_size, weight_decay=g.weight_decay,
                            epochs=epochs, hessian=hessian, memory_gb=cfg.methods.memory_gb,
                            preconditioner=preconditioner)


# Materialising the Gauss-Newton kernel costs n^2 P (its Gram matrix); the Krylov route through
# Gauss-Newton products costs ~3 n P per column per block, and LiSSA's cost model expects ~30
# blocks (fimoda.influence.solvers.lissa.KRYLOV_BLOCKS_EXPECTED): with k right-hand sides the
# kernel pays below n ~ 90 k rows (Concrete: 927 rows, kernel; FICO: 8,883 rows, products; the
# cpu profile's 4,000 FICO rows, kernel).
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
    from ...metrics import cosine, mean_se
    per = np.stack([cosine(a[:, t:t + 1], per_point[t])[0] for t in range(a.shape[1])])
    return mean_se(per, axis=1)


# Models whose Gauss-Newton matrix does not materialise (text; images beyond the cpu profile's
# fit rows, which materialise and take the kernel eigenbasis) run the series by its recurrence
# with seeded mini-batch Gauss-Newton products of the further training's batch size, one per
# step, as further training itself steps: on SST-2's cpu profile a fraction of the time of
# per-chunk full-batch products, with the same cosines to 3 decimals (at AdamW's lr 1e-6 the
# series is Grad-Dot x eta t to first order). A batch realisation adds noise independent of the
# gold standard's (fimoda.influence.trajectory_recurrence); the damping schedule needs an
# eigenbasis or CG per point: left out.
RECURRENCE_PRODUCTS = "batch"
NO_SCHEDULE = ("the damping schedule λ(t) = 1/(ηt) needs an eigenbasis or a CG solve per "
               "evaluation point; the Gauss-Newton matrix of the {model} model does not materialise "
               "(CG is skipped for these models in the paper): left out")


def _gauss_newton_curves(att, tcfg, steps, mlp: bool, model: str):
    """(per-point scores, seconds key, skipped {name: reason}) of the Gauss-Newton curves: one
    eigenbasis for the trajectory and the schedule, or (non-MLP models whose Gauss-Newton
    matrix does not materialise) the trajectory's recurrence alone."""
    from ...influence.operators import gauss_newton_fits
    from ...influence.trajectory import SpectralPairs, damping_schedule_curve, trajectory_curve
    if mlp or gauss_newton_fits(att, tcfg.memory_gb):
        gn = SpectralPairs(att, tcfg, int(steps.max()) - 1)
        return ({"trajectory": trajectory_curve(att, tcfg, steps, pairs=gn),
                 "schedule": damping_schedule_curve(att, tcfg, steps, pairs=gn)},
                f"gauss-newton ({gn.route}; trajectory + schedule)", {})
    rcfg = dataclasses.replace(tcfg, route="recurrence", products=RECURRENCE_PRODUCTS)
    return ({"trajectory": trajectory_curve(att, rcfg, steps)},
            f"gauss-newton (recurrence, {int(steps.max()) - 1} {RECURRENCE_PRODUCTS} products)",
            {"schedule": NO_SCHEDULE.format(model=model)})


def trajectory_study(cfg, optimizer: Optional[str] = None, mechanism: Optional[str] = None,
                     device: str = "cpu", directory=None) -> dict:
    """Trajectory-matched influence (Gauss-Newton; true Hessian for MLPs) and the damping
    schedule lambda(t) = 1/(eta t) at every evaluation point of notebook 02's gold standard,
    beside the paper's methods of notebook 03 (Grad-Dot and CG computed here if notebook 03 has
    not run). Against the Adam gold standard (``optimizer="adam"``: Adam's lr and epochs) the
    SGD-form curves with Adam's lr, and the trajectory with Adam's diagonal preconditioner at
    theta^f (:data:`ADAM_VARIANTS`: ``trajectory_adam``, ``trajectory_adam_h``). For MLPs also
    the non-stationarity term along the linearised full run (``trajectory_prop1``, true Hessian;
    ``trajectory_cor2``, Gauss-Newton; with Adam's D against Adam: ``trajectory_adam_prop1``,
    ``trajectory_adam_cor2``).
    Per-point scores cached in ``beyond_trajectory_<optimizer>.npz``. Returns eval points,
    cosine curves {name: (mean, se)}, the curves left out {name: reason}, the smallest
    true-Hessian eigenvalue seen by the Krylov route (None without it), seconds, and the gold
    standard's noise ceiling at its evaluation points (eq. 13; None for one seed:
    :func:`fimoda.paper.experiment.evaluation_ceiling`)."""
    from ...influence import compute_scores
    from ...influence.trajectory import SpectralPairs, damping_schedule_curve, trajectory_curve
    from .common import full_hessian_applies
    opt, mech = ex.gold_settings(cfg, optimizer, mechanism)
    d = Path(directory or ex.out_dir(cfg))
    gold = ex.load_gold(cfg, opt, mech, directory=d)
    a, t = ex.evaluation_gold(gold)
    tcfg = trajectory_config(cfg, opt)
    mlp, why_not_true = full_hessian_applies(cfg)
    k = min(len(gold["loo_indices"]), len(gold["test_indices"]))
    if mlp and _kernel_costlier(cfg, k):
        tcfg = dataclasses.replace(tcfg, materialize="never")
    path = d / f"beyond_trajectory_{opt}.npz"
    record = {"trajectory": dataclasses.asdict(tcfg), "eval_points": t.tolist(),
              "recurrence_products": RECURRENCE_PRODUCTS,
              "experiment": config_without(cfg, "further", "methods"),
              "preconditioners": list(ADAM_VARIANTS) if opt == "adam" else [],
              "nonstationary": ["prop1", "cor2"]}
    model, ds, loo, test = study_inputs(cfg, device)
    if not (np.array_equal(loo, gold["loo_indices"]) and np.array_equal(test, gold["test_indices"])):
        raise ValueError("notebook 02's gold standard was computed for other instances: rerun it")
    inputs = {**record, **ex.final_model_source(d),
              "theta": sha256_arrays(*[v for _, v in sorted(model.state_dict().items())]),
              "loo_indices": np.asarray(loo).tolist(), "test_indices": np.asarray(test).tolist()}

    def compute():
        att = ex.make_attributor(model, ds, cfg, loo, test, device)
        steps = eval_steps(cfg, t, att.n_train, tcfg.batch_size)
        seconds, ritz_min = {}, None
        t0 = time.perf_counter()
        per, key, skipped = _gauss_newton_curves(att, tcfg, steps, mlp, cfg.model)
        seconds[key] = time.perf_counter() - t0
        if mlp:
            t0 = time.perf_counter()
            htcfg = dataclasses.replace(tcfg, hessian="true")
            tr = SpectralPairs(att, htcfg, int(steps.max()) - 1)
            per["trajectory_h"] = trajectory_curve(att, htcfg, steps, pairs=tr)
            per["schedule_h"] = damping_schedule_curve(att, htcfg, steps, pairs=tr)
            seconds[f"true Hessian ({tr.blocks} Krylov blocks)"] = time.perf_counter() - t0
            ritz_min = float(tr.ritz.min())
            # theta^f is not stationary: Prop. 1's / Cor. 2's term (with Adam's D against Adam)
            pre = ADAM_VARIANTS[0] if opt == "adam" else "none"
            for h, term in (("true", "prop1"), ("gn", "cor2")):
                t0 = time.perf_counter()
                name = f"trajectory_{pre}_{term}" if pre != "none" else f"trajectory_{term}"
                ncfg = dataclasses.replace(tcfg, hessian=h, nonstationary=True, preconditioner=pre)
                per[name] = trajectory_curve(att, ncfg, steps)
                seconds[f"{name} (non-stationary, Krylov)"] = time.perf_counter() - t0
        else:
            skipped.update(trajectory_h=why_not_true, schedule_h=why_not_true)
        if opt == "adam" and mlp:  # Adam's preconditioner at theta^f (influence.preconditioner)
            for pre in ADAM_VARIANTS:
                for h, suffix in (("gn", ""), ("true", "_h")):
                    t0 = time.perf_counter()
                    pcfg = dataclasses.replace(tcfg, hessian=h, preconditioner=pre)
                    pp = SpectralPairs(att, pcfg, int(steps.max()) - 1)
                    per[f"trajectory_{pre}{suffix}"] = trajectory_curve(att, pcfg, steps, pairs=pp)
                    what = "true Hessian" if h == "true" else "gauss-newton"
                    seconds[f"{pre}-preconditioned, {what} ({pp.route})"] = \
                        time.perf_counter() - t0
        side = ex.load_scores(cfg, PAPER_SIDE, directory=d)
        for m in ("grad_dot", "cg"):
            if m not in side and (m != "cg" or mlp):      # CG: skipped for images and text
                side[m] = np.asarray(compute_scores(m, att, ex.method_config(m, cfg)))
        save_npz(path, **{f"per_{k}": v for k, v in per.items()},
                 **{f"side_{k}": v for k, v in side.items()},
                 seconds=np.asarray(json.dumps(seconds)), skipped=np.asarray(json.dumps(skipped)),
                 ritz_min=np.asarray(np.nan if ritz_min is None else ritz_min))

    z = store.cached(path, inputs, compute, load_npz, device=device,
                     what=f"notebook 07's trajectory curves of {cfg.dataset} ({opt})")
    per = {k[4:]: z[k] for k in z if k.startswith("per_")}
    seconds, skipped = json.loads(str(z["seconds"])), json.loads(str(z["skipped"]))
    ritz_min = float(z["ritz_min"]) if np.isfinite(z["ritz_min"]) else None
    side = {k[5:]: z[k] for k in z if k.startswith("side_")}
    side.update(ex.load_scores(cfg, PAPER_SIDE, directory=d))     # notebook 03's, if newer
    from ...metrics import curve
    curves = {m: curve(a, side[m], "cosine") for m in PAPER_SIDE if m in side}
    for k in per:
        curves[k] = curves_at_points(a, per[k])
    return {"eval_points": t, "curves": curves, "skipped": skipped, "seconds": seconds,
            "ritz_min": ritz_min, "optimizer": opt, "mechanism": mech, "lr": tcfg.lr,
            "n_train": len(ds.X_train), "ceiling": ex.evaluation_ceiling(gold, "mean")}


def trajectory_banner(study: dict) -> str:
    """What notebook 07 prints above the table: the further training matched, what it costs,
    which curves are left out and why."""
    lines = [f"lr {study['lr']:g}, gold standard {study['optimizer']}/{study['mechanism']}"]
    if study["optimizer"] != "sgd":
        pre = [label(k) for k in study["curves"] if "_adam" in k]
        lines.append(f"the gold standard trains with {study['optimizer']}: the SGD-form series "
                     f"with its lr ({study['lr']:g}) is compared"
                     + (f", and with Adam's preconditioner: {', '.join(pre)}" if pre else
                        f", without {study['optimizer']}'s preconditioner"))
    if study["ritz_min"] is not None:
        lines.append(f"smallest Ritz value of the true mean-loss Hessian: {study['ritz_min']:.3g}")
    lines.append("seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in study["seconds"].items()))
    for why in dict.fromkeys(study["skipped"].values()):          # each reason once
        names = [label(k) for k, w in study["skipped"].items() if w == why]
        lines.append(f"left out: {', '.join(names)}. {why}")
    return "\n".join(lines)


# notebook 07's curves and their legend labels (their whole look lives in fimoda.style)
LABELS = {k: label(k) for k in ("trajectory", "trajectory_h", "schedule", "schedule_h",
                                 "trajectory_adam", "trajectory_adam_h", "trajectory_adam_dv",
                                 "trajectory_adam_dv_h", "trajectory_prop1", "trajectory_cor2",
                                 "trajectory_adam_prop1", "trajectory_adam_cor2")}


def trajectory_table(study: dict):
    """Per method: cosine at the first point, max (and where), last; and, per evaluation point,
    whether the trajectory (GN) curve is at or above the best paper method there."""
    import pandas as pd
    t = study["eval_points"]
    rows = []
    for m, (mean, se) in study["curves"].items():
        k = int(np.argmax(mean))
        rows.append({"method": label(m), "cos first": mean[0], "cos max": mean[k],
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


def trajectory_gaps(study: dict):
    """:func:`best_paper_gap` of every curve of the study that is not a paper method, one row
    each."""
    import pandas as pd
    rows = [{"method": label(m), **best_paper_gap(study, m)}
            for m in study["curves"] if m not in PAPER_SIDE]
    return pd.DataFrame(rows).set_index("method")


def trajectory_figure(study: dict, title: str, unit: str = "epochs", curves=None):
    """Figure-2 style: the paper's methods (thin) and the trajectory-matched curves (thick, with
    their +-1 SE bands), each in its look of :func:`fimoda.style.method_style`, over the gold
    standard's noise ceiling (``study["ceiling"]`` where the study has one). ``curves``: the
    names (keys of ``study["curves"]``) to draw, None: all; a name the study did not compute is
    passed over, so a figure can be built up family by family; an unknown name is refused."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator
    from ...influence import METHODS
    from ..plots import ceiling_band, legend
    from ...style import method_style, theme
    keep = None if curves is None else set(curves)
    unknown = sorted((keep or set()) - set(LABELS) - set(METHODS))
    if unknown:
        raise ValueError(f"unknown curves {unknown}; choose from {sorted(LABELS)} and the paper's "
                         f"methods {list(METHODS)}")
    drawn = {m: c for m, c in study["curves"].items() if keep is None or m in keep}
    with theme():
        fig, ax = plt.subplots(figsize=(6.5, 4.2))
        t = study["eval_points"]
        ceiling_band(ax, study.get("ceiling"), t)
        for m, (mean, se) in drawn.items():
            style = method_style(m)
            if m in PAPER_SIDE:
                ax.plot(t, mean, lw=1.0, alpha=0.8, **style)
            else:
                ax.plot(t, mean, lw=2.2, **style)
                ax.fill_between(t, mean - se, mean + se, color=style["color"], alpha=0.07, lw=0)
        ax.axhline(0, color="k", lw=0.6)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))     # epochs or steps
        ax.set_xlabel(f"further training ({unit})")
        ax.set_ylabel("cosine similarity to the gold standard")
        ax.set_title(title)
        fig.tight_layout()
        legend(ax, drawn, fontsize="x-small", ncol=2)
    return fig
