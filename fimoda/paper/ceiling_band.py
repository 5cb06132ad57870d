"""The gold standard's noise ceiling on a cosine figure: a grey band of the cosine the exact
answer would reach against the gold (:class:`fimoda.yardsticks.NoiseCeiling`), its label, and the
legend entry :func:`fimoda.paper.plots.legend` adds for it (one per figure, whatever its panels)."""
from __future__ import annotations

from typing import Optional

import numpy as np

__all__ = ["CEILING_GID", "ceiling_label", "ceiling_band", "ceiling_handle"]

# the noise ceiling's band and line carry the gid "noise_ceiling:<seeds>", so legend() finds them
CEILING_GID = "noise_ceiling"
_CEILING_LOOK = {"color": "#9a9a9a", "alpha": 0.3}
_CEILING_LINE = (0, (4, 2))          # thin, dashed, no marker: unlike notebook 07's grey curves


def ceiling_label(n_seeds) -> str:
    """The legend label of the noise ceiling of a gold standard of ``n_seeds`` seeds (one number,
    or several: the panels of a grid)."""
    ks = sorted({int(k) for k in np.atleast_1d(n_seeds)})
    return f"noise ceiling of the gold ({', '.join(map(str, ks))} seeds)"


def ceiling_band(ax, ceiling, x=None, legend_label: Optional[str] = None):
    """Draw the gold standard's noise ceiling on a cosine axes: the cosine the exact answer
    would reach against this gold standard (:class:`fimoda.yardsticks.NoiseCeiling`, computed
    from the same gold arrays and equation as the curves), as a grey band of its mean +- 1
    standard error over test points with the mean as a thin grey line, beneath the curves, at
    the ceiling's evaluation points (or at ``x``). Both artists carry the gid
    ``"noise_ceiling:<seeds>"`` (:data:`CEILING_GID`), by which :func:`fimoda.paper.plots.legend` adds one entry,
    :func:`ceiling_label` (or ``legend_label``). Undefined points (NaN) leave a gap. ``ceiling``
    None (a gold standard of one seed has none) draws nothing. Returns the band (a
    PolyCollection) or None."""
    if ceiling is None:
        return None
    mean, se = ceiling.mean()
    x = np.asarray(ceiling.eval_points if x is None else x)   # the curves' own points
    if x.shape != mean.shape:
        raise ValueError(f"the ceiling has {mean.shape[0]} evaluation points, x {x.shape}")
    lab = legend_label or ceiling_label(ceiling.n_seeds)
    gid = f"{CEILING_GID}:{int(ceiling.n_seeds)}"
    ax.plot(x, mean, color=_CEILING_LOOK["color"], lw=1.0, ls=_CEILING_LINE, zorder=1.1,
            gid=gid, label="_" + lab)                # "_": the band stands for both in a legend
    return ax.fill_between(x, mean - se, mean + se, lw=0, zorder=1, gid=gid, label=lab,
                           **_CEILING_LOOK)


def ceiling_handle(ax_or_fig):
    """A legend handle for the noise-ceiling bands drawn anywhere on the figure of ``ax_or_fig``
    (an axes or a figure; one entry for all its panels), or None where none is drawn."""
    from matplotlib.patches import Patch
    axes = (ax_or_fig if hasattr(ax_or_fig, "get_axes") else ax_or_fig.figure).axes
    bands = [c for ax in axes for c in ax.collections
             if str(c.get_gid()).startswith(CEILING_GID + ":")]
    if not bands:
        return None
    labels = {c.get_label() for c in bands}
    lab = labels.pop() if len(labels) == 1 else \
        ceiling_label([int(c.get_gid().split(":")[1]) for c in bands])   # panels' seeds differ
    return Patch(facecolor=_CEILING_LOOK["color"], alpha=_CEILING_LOOK["alpha"] + 0.2,
                 edgecolor=_CEILING_LOOK["color"], linestyle=_CEILING_LINE, label=lab)
