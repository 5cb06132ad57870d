"""Notebook 06's picture of Table 2: for one test point, each method's score of every left-out
instance against its gold score, the gold's most helpful and most harmful instances ringed."""
from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np

from ..metrics import vector_cosine
from ..style import method_style, themed

__all__ = ["examples_figure"]


_HELPFUL, _HARMFUL = "#2ca02c", "#d62728"    # examples_figure's rings: green helps, red harms


def _scaled(values):
    """``values`` divided by the power of ten of their largest magnitude outside [0.01, 1000),
    and the axis label's suffix saying so (gold scores are ~1e-4: the ticks read 0 to 2)."""
    v = np.asarray(values, dtype=float)
    top = float(np.nanmax(np.abs(v))) if v.size else 0.0
    if top == 0.0 or not np.isfinite(top) or 1e-2 <= top < 1e3:
        return v, ""
    e = int(np.floor(np.log10(top)))
    return v / 10.0 ** e, f" (×1e{e})"


@themed
def examples_figure(gold_vec: np.ndarray, scores: dict, k: int = 1, title: str = ""):
    """Table 2 as a picture: for one test point, each method's score (y) of every left-out
    instance against its gold score (x), one panel per method of ``scores`` ({method: vector
    over the left-out set, the gold's order}). The k most helpful (largest gold) and k most
    harmful (smallest gold) instances are ringed green and red in every panel, the method's own
    picks filled in its colour; each panel's title gives the cosine over the left-out set. A
    method that ranks like the gold puts the rings at its panel's top right and bottom left."""
    if not scores:
        raise ValueError("examples_figure needs at least one method's scores")
    g, gx = _scaled(gold_vec)
    order = np.argsort(g)
    helpful, harmful = order[::-1][:k], order[:k]
    fig, axes = plt.subplots(1, len(scores), figsize=(3.6 * len(scores), 3.3), squeeze=False)
    for ax, (m, vec) in zip(axes[0], scores.items()):
        v, vx = _scaled(vec)
        look = method_style(m)
        cos = vector_cosine(g, v)                         # the scale of either does not matter
        ax.scatter(g, v, s=10, color=look["color"], alpha=0.45, lw=0)
        mine = np.argsort(v)
        picks = np.r_[mine[::-1][:k], mine[:k]]          # the method's own k top and k bottom
        ax.scatter(g[picks], v[picks], s=30, color=look["color"], marker="o")
        for idx, colour in ((helpful, _HELPFUL), (harmful, _HARMFUL)):
            ax.scatter(g[idx], v[idx], s=110, facecolors="none", edgecolors=colour, lw=1.6)
        ax.axhline(0, color="0.6", lw=0.6, zorder=0)
        ax.axvline(0, color="0.6", lw=0.6, zorder=0)
        ax.set_xlabel("gold score (eq. 13)" + gx)
        ax.set_ylabel(f"{look['label']} score" + vx)
        ax.set_title(f"{look['label']}: cosine {cos:.2f}", fontsize="medium")
    from matplotlib.lines import Line2D
    ring = dict(marker="o", ls="None", markersize=10, markerfacecolor="none", markeredgewidth=1.6)
    handles = [Line2D([], [], color="0.35", marker="o", ls="None", markersize=5,
                      label=f"the method's {k} most helpful\nand {k} most harmful"),
               Line2D([], [], markeredgecolor=_HELPFUL, label=f"gold's {k} most helpful", **ring),
               Line2D([], [], markeredgecolor=_HARMFUL, label=f"gold's {k} most harmful", **ring)]
    axes[0][-1].legend(handles=handles, fontsize="x-small", loc="upper left",
                       bbox_to_anchor=(1.02, 1.0))
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig
