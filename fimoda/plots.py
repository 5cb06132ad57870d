"""The paper's figures: cosine-vs-further-training curves (Fig. 2), Spearman (Fig. 6), max cosine
vs number of seeds (Fig. 3/7), sorted gold scores (Fig. 10), parameter distance, training curves
and the method-vs-method agreement matrix."""
from __future__ import annotations

from pathlib import Path

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

LABELS = {
    "grad_dot": "Grad-Dot", "grad_cos": "Grad-Cos", "cg": "CG", "lissa": "LiSSA",
    "lissa_h": "LiSSA-H", "trak": "TRAK (M=1)", "ekfac": "EK-FAC", "datainf": "DataInf",
    "arnoldi": "Arnoldi", "prop1": "Prop. 1", "cor2": "Cor. 2", "eq16": "Eq. (16)",
    "dense": "Dense IF",
}
STYLE = {  # first-order methods solid, influence functions dashed, the paper's own dotted
    "grad_dot": "-", "grad_cos": "-", "datainf": "-", "cg": "--", "lissa": "--",
    "lissa_h": "--", "trak": "-.", "ekfac": "-.", "arnoldi": "--", "prop1": ":", "cor2": ":",
    "eq16": ":", "dense": "--",
}


def label(method: str) -> str:
    return LABELS.get(method, method)


def savefig(fig, path) -> Path:
    """Save ``fig`` as PNG (tmp file + rename, so no half-written figure is left)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name("." + path.name + ".tmp.png")
    fig.savefig(tmp, dpi=120, bbox_inches="tight")
    tmp.replace(path)
    return path


def curves(ax, eval_points, results: dict, ylabel="cosine similarity", title=None):
    """One line per method with a +-1 standard-error band; ``results[m] = (mean, se)``."""
    x = np.asarray(eval_points)
    for m, (mean, se) in results.items():
        line, = ax.plot(x, mean, STYLE.get(m, "-"), label=label(m), lw=1.6)
        ax.fill_between(x, mean - se, mean + se, color=line.get_color(), alpha=0.2, lw=0)
    ax.set_xlabel("further training (epochs)" if x.dtype.kind in "iu" else "further training")
    ax.set_ylabel(ylabel)
    ax.axhline(0, color="k", lw=0.5)
    if x.dtype.kind in "iuf" and np.allclose(x, np.round(x)):
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    if title:
        ax.set_title(title)
    return ax


def cosine_figure(eval_points, results: dict, title: str, xlabel: str = "epochs",
                  ylabel: str = "cosine similarity"):
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    curves(ax, eval_points, results, ylabel=ylabel, title=title)
    ax.set_xlabel(f"further training ({xlabel})")
    ax.legend(fontsize=7, ncol=2)
    return fig


def seeds_figure(ks, results: dict, title: str):
    """Max cosine over epochs vs the number of seeds averaged; ``results[m] = (means, ses)``."""
    fig, ax = plt.subplots(figsize=(5, 3.6))
    for m, (mean, se) in results.items():
        ax.errorbar(ks, mean, yerr=se, fmt="o" + STYLE.get(m, "-"), label=label(m), ms=3,
                    capsize=2)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("number of seeds averaged")
    ax.set_ylabel("max cosine similarity")
    ax.set_title(title)
    ax.legend(fontsize=7, ncol=2)
    return fig


def sorted_gold_figure(gold: np.ndarray, eval_points, test_j: int = 0, n_lines: int = 6,
                       title: str = ""):
    """Gold scores a[:, t, j] sorted by value, for a few eval points t (paper Fig. 10)."""
    fig, ax = plt.subplots(figsize=(5, 3.6))
    T = gold.shape[1]
    ts = np.unique(np.linspace(1 if T > 1 else 0, T - 1, n_lines).astype(int))
    cmap = plt.get_cmap("viridis")
    for k, t in enumerate(ts):
        ax.plot(np.sort(gold[:, t, test_j]), color=cmap(k / max(1, len(ts) - 1)),
                label=f"t = {eval_points[t]}")
    ax.set_xlabel("left-out instances (sorted)")
    ax.set_ylabel("gold attribution score")
    ax.set_title(title or f"sorted gold scores, test instance {test_j}")
    ax.legend(fontsize=7)
    return fig


def param_distance_figure(eval_points, param_dist: np.ndarray, title: str = ""):
    """||theta_t - theta^f|| of the full-data runs over further training (mean and range)."""
    fig, ax = plt.subplots(figsize=(5, 3.4))
    d = np.atleast_2d(param_dist)
    ax.plot(eval_points, d.mean(0), label="mean over seeds")
    ax.fill_between(eval_points, d.min(0), d.max(0), alpha=0.25, label="min-max over seeds")
    ax.set_xlabel("further training")
    ax.set_ylabel(r"$\|\theta_t - \theta^f\|$")
    ax.set_title(title)
    ax.legend(fontsize=7)
    return fig


def training_curves_figure(record: dict, title: str = ""):
    """Loss curves from a final-model record: the mean minibatch loss of every epoch and, where
    recorded (tabular), the full-batch train/test loss at the evaluated epochs."""
    c = record.get("curves", {})
    fig, ax = plt.subplots(figsize=(5, 3.4))
    if c.get("minibatch_loss"):
        ax.plot(c["epoch"], c["minibatch_loss"], lw=0.8, alpha=0.6, label="minibatch loss (mean)")
    for key in ("train_loss", "test_loss"):
        if c.get(key):
            ax.plot(c["eval_epoch"], c[key], label=key.replace("_", " ") + " (full batch)")
    ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.legend(fontsize=7)
    return fig


def agreement_figure(names, M: np.ndarray, title: str = "method agreement (mean cosine)"):
    fig, ax = plt.subplots(figsize=(0.55 * len(names) + 2, 0.55 * len(names) + 1.5))
    im = ax.imshow(M, vmin=-1, vmax=1, cmap="RdBu_r")
    ax.set_xticks(range(len(names)), [label(n) for n in names], rotation=60, ha="right",
                  fontsize=8)
    ax.set_yticks(range(len(names)), [label(n) for n in names], fontsize=8)
    for a in range(len(names)):
        for b in range(len(names)):
            ax.text(b, a, f"{M[a, b]:.2f}", ha="center", va="center", fontsize=6)
    fig.colorbar(im, ax=ax, shrink=0.8)
    ax.set_title(title)
    return fig
