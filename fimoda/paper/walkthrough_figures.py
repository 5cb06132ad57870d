"""The pictures of the unifying-view walkthrough (notebook 00_walkthrough): the loss landscape with
the exact and approximate further-training paths, the score of one training point against one
test point over further training, and each view's cosine to the exact scores. They draw a
:class:`fimoda.paper.walkthrough.Walkthrough` (computed by
:func:`fimoda.paper.walkthrough.run`)."""
from __future__ import annotations

import numpy as np

from .walkthrough import TRAIN_X, TRAIN_Y, Walkthrough, loss_surface

__all__ = ["MARKED_STEPS", "landscape_figure", "difference_figure", "cosine_figure"]

MARKED_STEPS = (1, 2, 5, 10, 20, 50, 150)     # the steps marked along every path


def _styled(method: str, **over) -> dict:
    """:func:`fimoda.style.method_style` of ``method`` (the keys of every other figure: gold,
    grad_dot, dense, and notebook 07's true-Hessian trajectory_h / schedule_h), with ``over``
    replacing entries (a label, a line width)."""
    from . import plots
    return {**plots.method_style(method), **over}


def landscape_figure(w: Walkthrough, i: int):
    """Picture 1. Left: the mean training loss around theta^f (contours), theta^f, and the
    exact further-training path without each z_k (its end point numbered k). Right, zoomed on
    z_i's run over the loss without z_i: the exact path and where each approximation puts it
    after the same t steps (dots at :data:`MARKED_STEPS`), the influence function's end point a
    star."""
    import matplotlib.pyplot as plt
    th = w.theta_f
    fig, (ax, az) = plt.subplots(1, 2, figsize=(12, 5.2))
    ends = w.paths_loo[:, -1]
    lo = np.minimum(ends.min(0), th) - 0.35
    hi = np.maximum(ends.max(0), th) + 0.35
    for a, (l, h), out in ((ax, (lo, hi), None),
                           (az, (np.minimum(w.paths_loo[i].min(0), th) - 0.15,
                                 np.maximum(w.paths_loo[i].max(0), th) + 0.15), i)):
        g1, g2 = np.linspace(l[0], h[0], 160), np.linspace(l[1], h[1], 160)
        Z = loss_surface(g1, g2, leave_out=out)
        # levels spaced geometrically above the minimum, so the valley around theta^f shows
        levels = Z.min() + np.geomspace(1e-4, Z.max() - Z.min(), 12)
        a.contourf(g1, g2, Z, levels=np.r_[Z.min(), levels], cmap="Greys_r", alpha=0.35)
        a.contour(g1, g2, Z, levels=levels, colors="0.55", linewidths=0.6)
        a.set_xlim(l[0], h[0])
        a.set_ylim(l[1], h[1])
        a.set_aspect("equal")                 # gradients meet the contours at right angles
        a.plot(*th, "o", color="k", ms=7, zorder=5)
        a.annotate(r"$\theta^f$", th, textcoords="offset points", xytext=(6, -12))
        a.set_xlabel(r"$\theta_1$")
        a.set_ylabel(r"$\theta_2$")
    for k, path in enumerate(w.paths_loo):
        ax.plot(path[:, 0], path[:, 1], color="k", lw=1.8 if k == i else 0.8,
                alpha=1.0 if k == i else 0.5)
        ax.annotate(str(k), path[-1], textcoords="offset points", xytext=(3, 3), fontsize=8)
    ax.set_title("without each $z_k$: exact further training from $\\theta^f$\n"
                 f"({len(w.steps) - 1} full-batch steps, $\\eta$ = {w.lr:g}; contours: "
                 "training loss)", fontsize=9)
    marks = [t for t in MARKED_STEPS if t < len(w.steps)]
    pred = w.predicted_paths(i)
    for name, path, kw in (
            ("gold", w.paths_loo[i], dict(lw=2.2, label="exact further training")),
            ("grad_dot", pred["first_order"],
             dict(label=r"first order: $\theta^f + (\eta t/n)\,\nabla L(z_i)$")),
            ("schedule_h", pred["schedule"],
             dict(label=r"damped IF, $\lambda = 1/(\eta t)$")),
            ("trajectory_h", pred["trajectory"], dict(label="linearised further training"))):
        line, = az.plot(path[:, 0], path[:, 1], **_styled(name, **kw, marker=None))
        az.plot(path[marks, 0], path[marks, 1], "o", ms=3.5, color=line.get_color())
    az.plot(*pred["influence"], "*", ms=14, **{k: v for k, v in _styled(
        "dense", label=r"influence function: $\theta^f + \bar H^{-1}\nabla L(z_i)/n$").items()
        if k in ("color", "label")}, zorder=6)
    for t in marks:
        az.annotate(f"t={t}", w.paths_loo[i, t], textcoords="offset points", xytext=(5, -3),
                    fontsize=7)
    az.set_title(f"without $z_{{{i}}}$ = {TRAIN_X[i]}, y = {TRAIN_Y[i]}: where each view puts "
                 f"the run\n(dots: the same steps t on every path; contours: loss without "
                 f"$z_{{{i}}}$)", fontsize=9)
    az.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    fig.tight_layout()
    return fig


def difference_figure(w: Walkthrough, i: int, j: int):
    """Picture 2: the test-loss difference a_i(z_j, t) over further-training steps t (log
    scale), exact and by each approximation, the influence function as its t -> inf level."""
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    t = w.steps[1:]
    for name, curve, kw in (
            ("gold", w.gold, dict(lw=2.4, label="exact further training")),
            ("grad_dot", w.first_order, dict(label=r"first order: Grad-Dot $\times\ \eta t/n$")),
            ("schedule_h", w.schedule, dict(label=r"damped IF, $\lambda = 1/(\eta t)$")),
            ("trajectory_h", w.trajectory, dict(label="linearised further training"))):
        ax.plot(t, curve[1:, j, i], **_styled(name, **kw))
    ax.axhline(w.influence[j, i], **_styled("dense", label=r"influence function ($t\to\infty$)",
                                            marker=None, markevery=None, lw=1.2))
    ax.axhline(0, color="k", lw=0.5)
    ax.set_xscale("log")
    ax.set_xlabel("further-training steps t")
    ax.set_ylabel(f"test-loss change $a_{{{i}}}(z_{{{j}}}, t)$ (nats)")
    top = 1.6 * max(np.abs(w.gold[:, j, i]).max(), abs(w.influence[j, i]))
    ax.set_ylim(-top if w.gold[-1, j, i] < 0 else -0.1 * top, top if w.gold[-1, j, i] > 0
                else 0.1 * top)
    ax.set_title(f"leave out $z_{{{i}}}$, test point $z_{{{j}}}$", fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def cosine_figure(w: Walkthrough):
    """Picture 3, the paper's Figure 2 in miniature: the cosine over the training points between
    the exact scores and each approximation's, against further-training steps (mean +- SE over
    the test points)."""
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    t = w.steps[1:]
    labels = {"grad_dot": ("grad_dot", "Grad-Dot (first order)"),
              "influence": ("dense", r"influence function ($\lambda \to 0$, second order)"),
              "schedule": ("schedule_h", r"damped IF, $\lambda = 1/(\eta t)$"),
              "trajectory": ("trajectory_h", "linearised further training")}
    for m, (mean, se) in w.cosines(tuple(labels)).items():
        style, lab = labels[m]
        line, = ax.plot(t, mean, **_styled(style, label=lab, lw=1.8))
        ax.fill_between(t, mean - se, mean + se, color=line.get_color(), alpha=0.2, lw=0)
    ax.set_xscale("log")
    ax.set_xlabel("further-training steps t")
    ax.set_ylabel("cosine to exact further training\n(over the training points)")
    ax.set_title(f"mean $\\pm$ SE over {w.gold.shape[1]} test points", fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig
