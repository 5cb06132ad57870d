"""Notebook 08's figures: the additivity error of group leave-out against |S|, and the cosine over
groups between each method's summed score and the group gold against |S|, drawn in the theme and
with each method's look of :mod:`fimoda.style`."""
from __future__ import annotations

import matplotlib.pyplot as plt
import matplotlib.ticker
import numpy as np

from ..style import legend_handles, method_style, themed

__all__ = ["additivity_figure", "group_cosine_figure"]


def _size_axis(ax, sizes):
    """x: |S| on a log axis, ticked at the sizes run."""
    ax.set_xscale("log")
    ax.set_xticks(list(sizes))
    ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.set_xlabel("|S|, instances left out together")


@themed
def additivity_figure(eval_points, table: dict, title: str, unit: str = "epoch",
                      at=None):
    """Two panels against |S|: the relative L2 error |g_S - sum_{i in S} a_i| / |g_S| and
    1 - cos(g_S, sum a_i) over the test points (mean +- SE over the groups of a size), one line
    per evaluation point of ``at`` (indices into ``eval_points``; default the first, middle and
    last). ``table``: :func:`fimoda.paper.experiment.yardsticks.additivity_table`'s second part."""
    sizes = sorted(table)
    n = len(eval_points)
    at = sorted({0, n // 2, n - 1}) if at is None else list(at)
    fig, axes = plt.subplots(1, 2, figsize=(9.5, 3.6))
    for ax, key, ylabel in zip(axes, ("rel_l2", "one_minus_cos"),
                               ("relative L2 error", "1 - cosine")):
        for t in at:
            mean = np.array([table[k][key][0][t] for k in sizes])
            se = np.array([table[k][key][1][t] for k in sizes])
            when = f"{eval_points[t]:g} {unit}" + ("" if eval_points[t] == 1 else "s")
            ax.errorbar(sizes, mean, yerr=se, marker="o", capsize=3, lw=1.4, label=f"after {when}")
        _size_axis(ax, sizes)
        ax.set_ylabel(ylabel)
        ax.set_ylim(bottom=0)
    axes[0].legend(fontsize="small")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


@themed
def group_cosine_figure(mean, se, title: str):
    """Cosine over the groups of each size between the group gold and each row's summed score
    (mean +- SE over test points) against |S|; ``mean``, ``se``: the tables of
    :func:`fimoda.paper.experiment.yardsticks.group_cosine_table` (rows: legend labels of
    :mod:`fimoda.style`, the leave-one-out gold as its "further training (gold)")."""
    from ..style import LABELS
    keys = {v: k for k, v in LABELS.items()}
    sizes = [int(k) for k in mean.columns]
    fig, ax = plt.subplots(figsize=(6.0, 3.8))
    drawn = []
    for name in mean.index:
        key = keys[name]
        style = {**method_style(key), "markevery": None}
        ax.errorbar(sizes, mean.loc[name].to_numpy(float), yerr=se.loc[name].to_numpy(float),
                    capsize=2, lw=2.2 if key == "gold" else 1.4, **style)
        drawn.append(key)
    _size_axis(ax, sizes)
    ax.set_ylabel("cosine over groups")
    ax.axhline(0, color="k", lw=0.6)
    ax.set_title(title)
    handles, labels = legend_handles(drawn)
    ax.legend(handles, labels, fontsize="x-small", loc="upper left", bbox_to_anchor=(1.02, 1.0))
    fig.tight_layout()
    return fig
