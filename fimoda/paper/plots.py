"""The paper's figures: cosine-vs-further-training curves (Fig. 2), Spearman (Fig. 6), max cosine
vs number of seeds (Fig. 3/7), sorted gold scores (Fig. 10), parameter distance, training curves
and the method-vs-method agreement matrix. Every cosine figure can carry the gold standard's noise
ceiling as a grey band (:func:`ceiling_band`), which :func:`legend` lists. Every figure is drawn
in the theme of :mod:`fimoda.style` with each method's fixed look (:func:`method_style`);
:func:`savefig` writes it and, in a notebook, shows it. Importing this module leaves matplotlib's
backend alone."""
from __future__ import annotations

import sys
from pathlib import Path

import matplotlib.pyplot as plt
import matplotlib.ticker
import numpy as np

from ..data.specs import fig2_panel_order
from ..io import atomic_write
from ..style import (LABELS, METHOD_KEYS, STYLE_KEYS, damping_label, label, legend_handles,
                     method_style, theme, themed)
from .ceiling_band import CEILING_GID, ceiling_band, ceiling_handle, ceiling_label
from .examples_figure import examples_figure

__all__ = ["LABELS", "METHOD_KEYS", "STYLE_KEYS", "FIG2_ORDER", "NORMALISATIONS", "CEILING_GID",
           "agreement_figure", "ceiling_band", "ceiling_label", "cosine_figure", "curves",
           "examples_figure",
           "damping_label", "fig10_eval_indices", "fig2_order", "grid_shape", "label", "legend",
           "legend_handles", "mechanisms_figure", "method_style", "panel_letter",
           "param_distance_figure", "savefig", "seeds_figure", "sorted_average",
           "sorted_gold_figure", "sorted_scores_curves", "sorted_scores_figure", "show", "theme",
           "themed", "training_curves_figure"]


def __getattr__(name: str):
    """``FIG2_ORDER``: the datasets of the paper's Figure 2 in its panel order, a stand-in in its
    original's place (a view of the dataset specs: :func:`fimoda.data.specs.fig2_panel_order`)."""
    if name == "FIG2_ORDER":
        return fig2_panel_order()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def fig2_order(datasets) -> list:
    """``datasets`` (duplicates dropped) in the panel order of the paper's Figure 2: (a) concrete,
    (b) energy, (c) fico, (d) folktables / adult, (e) cifar10 / fashion_mnist, (f) sst2; any other
    name after these, in the order given."""
    seen = list(dict.fromkeys(datasets))
    rank = {d: k for k, d in enumerate(fig2_panel_order())}
    return sorted(seen, key=lambda d: (rank.get(d, len(rank)), seen.index(d)))


def panel_letter(k: int) -> str:
    """The label of the k-th panel (0-based): "(a)", "(b)", ..., then "(27)", "(28)", ..."""
    return f"({'abcdefghijklmnopqrstuvwxyz'[k]})" if k < 26 else f"({k + 1})"


def grid_shape(n: int, max_cols: int = 3) -> tuple:
    """(rows, cols) for n panels: one row up to ``max_cols``, 2 x 2 for four, then rows of 3."""
    if n < 1:
        raise ValueError("no panels")
    cols = n if n <= max_cols else (2 if n == 4 else max_cols)
    return -(-n // cols), cols


def savefig(fig, path, pdf: bool = True) -> Path:
    """Save ``fig`` as PNG (atomically, :func:`fimoda.io.atomic_write`, so no half-written figure
    is left) and, unless ``pdf=False``, as a vector PDF of the same name next to it; inside an
    IPython kernel (a notebook, interactive or run by papermill) show the saved PNG once as the
    cell's image output, its file name in the output's metadata (``{"image/png": {"filename":
    ...}}``). The figure is then closed (pyplot forgets it: no second copy from the inline
    backend at the end of the cell, no figures piling up in long batch runs); the object stays
    usable. Returns the PNG's path. In a profile's figures folder, name the file by its kind
    (:func:`fimoda.paper.figures.figure_path`): the figure index lists no other name."""
    path = Path(path)
    targets = [(path, "png")] + ([(path.with_suffix(".pdf"), "pdf")] if pdf else [])
    for target, fmt in targets:
        atomic_write(target, lambda fh: fig.savefig(fh, dpi=120, bbox_inches="tight", format=fmt))
    plt.close(fig)
    if _in_kernel():
        from IPython.display import Image, display
        display(Image(filename=str(path), metadata={"filename": path.name}))
    return path


def show(fig):
    """Show ``fig`` once as a cell's image output in a notebook (an IPython kernel), without
    saving it (a figure built up step by step; a figure that is saved is shown by
    :func:`savefig`), then close it; outside a kernel leave it as it is. Returns ``fig``."""
    if _in_kernel():
        import io
        from IPython.display import Image, display
        buf = io.BytesIO()
        fig.savefig(buf, dpi=120, bbox_inches="tight", format="png")
        plt.close(fig)
        display(Image(data=buf.getvalue()))
    return fig


def _in_kernel() -> bool:
    """Whether this process is an IPython kernel (not a terminal IPython, not plain Python)."""
    ipython = sys.modules.get("IPython")                # never imported: not a kernel
    shell = ipython.get_ipython() if ipython is not None else None
    return shell is not None and getattr(shell, "kernel", None) is not None


def curves(ax, eval_points, results: dict, ylabel="cosine similarity", title=None):
    """One line per method with a +-1 standard-error band in the method's colour
    (:func:`method_style`; the more methods, the fainter the bands); ``results[m] = (mean,
    se)``."""
    x = np.asarray(eval_points)
    band = min(0.18, 0.8 / max(1, len(results)))     # fainter bands when many overlap
    for m, (mean, se) in results.items():
        style = method_style(m)
        ax.plot(x, mean, lw=1.6, **style)
        ax.fill_between(x, mean - se, mean + se, color=style["color"], alpha=band, lw=0)
    ax.set_xlabel("further training (epochs)" if x.dtype.kind in "iu" else "further training")
    ax.set_ylabel(ylabel)
    ax.axhline(0, color="k", lw=0.6)
    if x.dtype.kind in "iuf" and np.allclose(x, np.round(x)):
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    if title:
        ax.set_title(title)
    return ax


def legend(ax_or_fig, methods, **kw):
    """The legend of ``methods`` in the fixed order and look of :func:`legend_handles`, on an
    axes or (one legend for a grid) a figure, and last one entry for the noise ceiling where
    :func:`ceiling_band` drew it. An axes' legend of more than five entries goes
    outside, to the right of the axes, top-aligned, in one column, so that it hides no curve
    (call it after ``tight_layout``, which would otherwise squeeze the axes to make room; the
    saved file's tight bounding box takes the legend in)."""
    handles, labels = legend_handles(methods)
    band = ceiling_handle(ax_or_fig)
    if band is not None:
        handles, labels = handles + [band], labels + [band.get_label()]
    if hasattr(ax_or_fig, "get_xlim") and len(handles) > 5:
        kw = {**kw, "loc": "upper left", "bbox_to_anchor": (1.02, 1.0), "ncol": 1}
    return ax_or_fig.legend(handles, labels, **kw)


@themed
def cosine_figure(eval_points, results: dict, title: str, xlabel: str = "epochs",
                  ylabel: str = "cosine similarity", ceiling=None):
    """One panel of Figure 2 (:func:`curves`), with the gold standard's noise ``ceiling``
    (:func:`ceiling_band`) where given: at ``eval_points``, the curves' own."""
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    ceiling_band(ax, ceiling, eval_points)
    curves(ax, eval_points, results, ylabel=ylabel, title=title)
    ax.set_xlabel(f"further training ({xlabel})")
    legend(ax, results, fontsize="x-small", ncol=2)
    return fig


@themed
def mechanisms_figure(eval_points, panels: dict, title: str, xlabel: str = "epochs",
                      ceilings=None):
    """One panel per leave-out mechanism (``panels[mechanism] = {method: (mean, se)}``), shared
    y-axis, so the same method can be compared across the two gold standards; ``ceilings``:
    {mechanism: its gold standard's noise ceiling} (:func:`ceiling_band`), where given."""
    fig, axes = plt.subplots(1, len(panels), figsize=(4.8 * len(panels), 3.6), sharey=True,
                             squeeze=False)
    for ax, (mech, res) in zip(axes[0], panels.items()):
        ceiling_band(ax, (ceilings or {}).get(mech), eval_points)
        curves(ax, eval_points, res, title=f"{title}\nleave-out: {mech}")
        ax.set_xlabel(f"further training ({xlabel})")
    fig.tight_layout()
    legend(axes[0, -1], [m for res in panels.values() for m in res], fontsize="x-small")
    return fig


@themed
def seeds_figure(ks, results: dict, title: str, ceiling=None):
    """Max cosine over epochs vs the number of seeds averaged; ``results[m] = (means, ses)``.
    ``ceiling``: the gold standard's noise ceiling (all its seeds), drawn as the ceiling a gold
    of k seeds would have at its best evaluation point
    (:meth:`fimoda.yardsticks.NoiseCeiling.peak_for_seeds`)."""
    fig, ax = plt.subplots(figsize=(5, 3.6))
    if ceiling is not None:
        ceiling_band(ax, ceiling.peak_for_seeds(ks), ks,
                     legend_label=f"noise ceiling of a k-seed gold (from {ceiling.n_seeds} seeds)")
    for m, (mean, se) in results.items():
        ax.errorbar(ks, mean, yerr=se, capsize=2, lw=1.4,
                    **{**method_style(m), "markevery": None})     # a marker at every k
    ax.set_xscale("log", base=2)
    ax.set_xlabel("number of seeds averaged")
    ax.set_ylabel("max cosine similarity")
    ax.set_title(title)
    legend(ax, results, fontsize="x-small", ncol=2)
    return fig


@themed
def sorted_gold_figure(gold: np.ndarray, eval_points, test_j: int = 0, n_lines: int = 6,
                       title: str = ""):
    """Gold scores a[:, t, j] of ONE test instance j sorted by value, one line per eval point t
    (a look at a single instance; the paper's Fig. 10 is :func:`sorted_scores_figure`)."""
    fig, ax = plt.subplots(figsize=(5, 3.6))
    T = gold.shape[1]
    ts = np.unique(np.linspace(1 if T > 1 else 0, T - 1, n_lines).astype(int))
    cmap = plt.get_cmap("viridis")
    for k, t in enumerate(ts):
        shade = 0.85 * k / max(1, len(ts) - 1)      # viridis up to 0.85: no pale yellow end
        ax.plot(np.sort(gold[:, t, test_j]), color=cmap(shade),
                label=f"t = {eval_points[t]}")
    ax.set_xlabel("left-out instances (sorted)")
    ax.set_ylabel("gold attribution score")
    ax.set_title(title or f"sorted gold scores, test instance {test_j}")
    ax.legend(fontsize="x-small")
    return fig


NORMALISATIONS = ("maxabs", "l2", "none")


def sorted_average(scores, normalize: str = "maxabs"):
    """Sort every test instance's scores over the left-out set and average over test instances
    (paper Fig. 10). ``scores``: (test, left-out) -- a method's ``s[j, i]``, or a gold slice
    ``a[:, t, :].T``. Each row is sorted in increasing order, then normalised on its own:
    ``"maxabs"`` divides it by its largest absolute value (so every sorted curve spans at most
    [-1, 1] and touches -1 or +1 at an end), ``"l2"`` by its Euclidean norm (the scale the
    cosine similarity of Fig. 2 ignores), ``"none"`` leaves it; an all-zero row stays zero. The
    normalisation is per test instance, before averaging, so that test instances with large
    scores do not dominate the mean and methods on different scales (Grad-Dot vs Grad-Cos vs
    gold) can be compared by shape. Returns (mean, se) over test instances, each (left-out,):
    position k is the average k-th smallest normalised score."""
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 2 or s.shape[0] == 0 or s.shape[1] == 0:
        raise ValueError(f"scores must be a non-empty (test, left-out) array, got {s.shape}")
    if not np.all(np.isfinite(s)):
        raise ValueError("scores contain NaN or inf")
    s = np.sort(s, axis=1)
    if normalize == "maxabs":
        scale = np.abs(s).max(axis=1, keepdims=True)
    elif normalize == "l2":
        scale = np.linalg.norm(s, axis=1, keepdims=True)
    elif normalize == "none":
        scale = np.ones((s.shape[0], 1))
    else:
        raise ValueError(f"unknown normalize {normalize!r}; choose from {NORMALISATIONS}")
    s = s / np.where(scale > 0, scale, 1.0)
    n = s.shape[0]
    se = s.std(axis=0, ddof=1) / np.sqrt(n) if n > 1 else np.zeros(s.shape[1])
    return s.mean(axis=0), se


def fig10_eval_indices(n_eval: int) -> list:
    """The eval-point indices Fig. 10 draws: the first after theta^f and the last (one if equal).
    Indices into gold scores from which t = 0 was already dropped (``evaluation_gold``)."""
    if n_eval < 1:
        raise ValueError("no evaluation points")
    return [0] if n_eval == 1 else [0, n_eval - 1]


def sorted_scores_curves(gold: np.ndarray, scores: dict, t_indices, normalize: str = "maxabs"):
    """{t: {"gold": (mean, se), method: (mean, se), ...}} for every eval-point index t of
    ``t_indices``: the sorted, normalised, test-averaged curves of :func:`sorted_average` for the
    gold scores a[:, t, :] (left-out x eval point x test) and every method's s[j, i] (the methods
    do not depend on t; they are repeated for each panel)."""
    gold = np.asarray(gold, dtype=np.float64)
    if gold.ndim != 3:
        raise ValueError(f"gold scores must be (left-out, eval points, test), got {gold.shape}")
    meth = {}
    for m, s in scores.items():
        if np.shape(s) != (gold.shape[2], gold.shape[0]):
            raise ValueError(f"{m}: scores must be (test, left-out) = "
                             f"{(gold.shape[2], gold.shape[0])}, got {np.shape(s)}")
        meth[m] = sorted_average(s, normalize)
    return {int(t): {"gold": sorted_average(gold[:, t, :].T, normalize), **meth}
            for t in t_indices}


@themed
def sorted_scores_figure(gold: np.ndarray, eval_points, scores: dict, t_indices=None,
                         normalize: str = "maxabs", unit: str = "epoch", title: str = ""):
    """Paper Fig. 10: one panel per eval-point index in ``t_indices`` (default: the first after
    theta^f and the last, :func:`fig10_eval_indices`) with the gold curve (eq. 13) and the
    methods' curves (e.g. Grad-Dot, Grad-Cos) from :func:`sorted_scores_curves`, mean +- 1 SE
    over test instances. ``eval_points`` label the panels ("after k <unit>s"; ``unit``: epoch |
    step)."""
    gold = np.asarray(gold)
    t_indices = fig10_eval_indices(gold.shape[1]) if t_indices is None else list(t_indices)
    cur = sorted_scores_curves(gold, scores, t_indices, normalize)
    fig, axes = plt.subplots(1, len(t_indices), figsize=(4.6 * len(t_indices), 3.6),
                             squeeze=False, sharey=True)
    x = np.arange(1, gold.shape[0] + 1)
    for ax, t in zip(axes[0], t_indices):
        for name, (mean, se) in cur[int(t)].items():
            style = method_style(name)
            ax.plot(x, mean, lw=2.0 if name == "gold" else 1.6, **style)
            ax.fill_between(x, mean - se, mean + se, color=style["color"], alpha=0.18, lw=0)
        ax.axhline(0, color="k", lw=0.5)
        k = eval_points[t]
        ax.set_title(f"after {k} {unit}{'' if k == 1 else 's'} of further training", fontsize=10)
        ax.set_xlabel("left-out instances, sorted per test instance")
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    norm = {"maxabs": "score / max |score|", "l2": "score / ||scores||",
            "none": "score"}[normalize]
    axes[0][0].set_ylabel(f"sorted {norm}\n(mean over test instances)")
    legend(axes[0][-1], cur[int(t_indices[0])], fontsize="x-small")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


@themed
def param_distance_figure(eval_points, param_dist: np.ndarray, title: str = ""):
    """||theta_t - theta^f|| of the full-data runs over further training (mean and range)."""
    fig, ax = plt.subplots(figsize=(5, 3.4))
    d = np.atleast_2d(param_dist)
    ax.plot(eval_points, d.mean(0), label="mean over seeds")
    ax.fill_between(eval_points, d.min(0), d.max(0), alpha=0.25, label="min-max over seeds")
    ax.set_xlabel("further training")
    ax.set_ylabel(r"$\|\theta_t - \theta^f\|$")
    ax.set_title(title)
    ax.legend(fontsize="x-small")
    return fig


@themed
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
    ax.legend(fontsize="x-small")
    return fig


@themed
def agreement_figure(names, M: np.ndarray, title: str = "method agreement (mean cosine)"):
    """The methods' agreement matrix: ``M[a, b]`` the mean cosine over test points between
    method ``names[a]``'s and ``names[b]``'s scores, in a diverging map from -1 to 1."""
    fig, ax = plt.subplots(figsize=(0.55 * len(names) + 2, 0.55 * len(names) + 1.5))
    im = ax.imshow(M, vmin=-1, vmax=1, cmap="RdBu_r")
    ax.grid(False)                                   # the theme's grid would cross the cells
    ax.set_xticks(range(len(names)), [label(n) for n in names], rotation=60, ha="right",
                  fontsize=8)
    ax.set_yticks(range(len(names)), [label(n) for n in names], fontsize=8)
    for a in range(len(names)):
        for b in range(len(names)):
            ax.text(b, a, f"{M[a, b]:.2f}", ha="center", va="center", fontsize=6,
                    color="w" if abs(M[a, b]) > 0.6 else "k")    # readable on dark cells
    fig.colorbar(im, ax=ax, shrink=0.8)
    ax.set_title(title)
    return fig
