"""Figure 2 across datasets: the datasets of a profile whose gold standard has been computed, their
results, and the grid of cosine curves, each panel with its gold standard's noise ceiling, with its
max-cosine table (also Figs. 4 and 5 with another gold optimizer or eq. 17)."""
from __future__ import annotations

from typing import Optional

import numpy as np

from .evaluation import evaluation_ceiling, evaluation_gold
from .gold_runs import eval_unit, gold_settings, load_gold
from .methods import load_scores
from .setup import out_dir


def gold_datasets(profile: str, datasets, optimizer: Optional[str] = None,
                  mechanism: Optional[str] = None) -> list:
    """The datasets of ``profile`` among ``datasets`` whose gold standard (:func:`gold_settings`)
    has been computed, in the panel order of the paper's Figure 2."""
    from ..config import get_config
    from ..plots import fig2_order
    out = []
    for ds in fig2_order(datasets):
        cfg = get_config(ds, profile)            # the file's name does not depend on the seeds
        opt, mech = gold_settings(cfg, optimizer, mechanism)
        if (out_dir(cfg) / f"gold_{opt}_{mech}.npz").exists():
            out.append(ds)
    return out


def with_results(profile: str, datasets, optimizer: Optional[str] = None,
                 mechanism: Optional[str] = None, methods=None, seeds: Optional[int] = None) -> list:
    """[(cfg, gold, {method: scores})] for the datasets of ``profile`` whose gold standard
    (:func:`gold_settings`) has been computed, in the panel order of the paper's Figure 2;
    ``seeds``: the run's number of further-training seeds where it overrode the profile's."""
    from ...influence import default_methods
    from .setup import run_config
    methods = list(methods or default_methods())
    out = []
    for ds in gold_datasets(profile, datasets, optimizer, mechanism):
        cfg = run_config(ds, profile, seeds=seeds)
        out.append((cfg, load_gold(cfg, optimizer, mechanism), load_scores(cfg, methods)))
    return out


def summary(profile: str, datasets, optimizer: Optional[str] = None,
            mechanism: Optional[str] = None, adjust: str = "mean", methods=None,
            seeds: Optional[int] = None):
    """Figure 2 as a grid over the datasets with results, and the max-cosine table. Each panel
    uses its dataset's gold standard (:func:`gold_settings`; None = the dataset's default).

    Panels follow the paper's order (:func:`fimoda.paper.plots.fig2_order`: concrete, energy, fico,
    folktables/adult, cifar10/fashion_mnist, sst2), lettered (a), (b), ... over the panels drawn,
    up to three per row; the x-axis is in epochs for datasets whose further training is
    evaluated per epoch (tabular) and in steps where the config sets ``further.max_steps`` or
    ``further.eval_every`` (image, text). One legend for the whole figure. The table's columns
    are the datasets in panel order. Every method keeps its look (:func:`fimoda.style.method_style`)
    in every panel, whichever methods a panel skips; the legend lists every method drawn in any
    panel, in the fixed order of :data:`fimoda.style.STYLE_KEYS`, then the noise ceiling: each
    panel's grey band is its own gold standard's (:func:`evaluation_ceiling`, same equation),
    absent where that gold standard has one seed."""
    from ...style import theme
    have = with_results(profile, datasets, optimizer, mechanism, methods, seeds)
    if not have:
        raise FileNotFoundError(f"no gold results for {list(datasets)} in the {profile} profile")
    with theme():
        return _grid(have, optimizer, mechanism, adjust)


def _grid(have, optimizer, mechanism, adjust):
    """:func:`summary`'s figure and table for ``have`` (from :func:`with_results`)."""
    import matplotlib.pyplot as plt
    import pandas as pd
    from ...metrics import curve
    from ..plots import ceiling_band, curves, grid_shape, legend, panel_letter
    from ...style import label
    nrows, ncols = grid_shape(len(have))
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.6 * ncols, 3.8 * nrows), squeeze=False)
    flat = axes.ravel()
    rows = {}
    drawn = []
    for k, (ax, (cfg, gold, scores)) in enumerate(zip(flat, have)):
        a, t = evaluation_gold(gold, adjust)
        res = {m: curve(a, s) for m, s in scores.items()}
        name = cfg.dataset + (f" (stand-in for {cfg.stand_in_for})" if cfg.stand_in_for else "")
        opt, mech = gold_settings(cfg, optimizer, mechanism)
        eq = "" if adjust == "mean" else ", eq. 17"
        ceiling_band(ax, evaluation_ceiling(gold, adjust), t)
        curves(ax, t, res, title=f"{panel_letter(k)} {name}\n({opt}, {mech}{eq})")
        ax.set_xlabel(f"further training ({eval_unit(cfg)}s)")
        drawn += res
        rows[name] = {label(m): float(np.max(v[0])) for m, v in res.items()}
    for ax in flat[len(have):]:      # the unused cells of the last row
        ax.remove()
    fig.tight_layout()
    if drawn:
        legend(fig, drawn, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    return fig, pd.DataFrame(rows)


def grid_name(optimizer: Optional[str] = None, mechanism: Optional[str] = None,
              adjust: str = "mean", kind: str = "figure2") -> str:
    """File stem of a Figure-2-style grid (``kind="figure2"``) or its max-cosine table
    (``"max_cosine"``), :func:`fimoda.paper.figures.figure_name`: the gold optimizer and mechanism
    when one was chosen for every panel, ``eq17`` for eq. (17); e.g. ``figure2`` (Fig. 2),
    ``figure2_adam`` (Fig. 4), ``figure2_eq17`` (Fig. 5)."""
    from ..figures import figure_name
    return figure_name(kind, **_grid_settings(optimizer, mechanism, adjust)).rsplit(".", 1)[0]


def _grid_settings(optimizer, mechanism, adjust) -> dict:
    """The file-name settings (:mod:`fimoda.paper.figures`) of a grid and its table."""
    return {"optimizer": optimizer, "mechanism": mechanism, "eq": 13 if adjust == "mean" else 17}


def summary_figure(profile: str, datasets, optimizer: Optional[str] = None,
                   mechanism: Optional[str] = None, adjust: str = "mean",
                   seeds: Optional[int] = None):
    """:func:`summary` saved to the profile's figures folder as ``<grid_name>.png`` (+ PDF) and
    its table as ``max_cosine<...>.csv``; returns (path of the figure, table)."""
    from ..figures import figure_path
    from ...io import figures_dir
    from ..plots import savefig
    d, settings = figures_dir(profile), _grid_settings(optimizer, mechanism, adjust)
    path, csv = figure_path(d, "figure2", **settings), figure_path(d, "max_cosine", **settings)
    fig, table = summary(profile, datasets, optimizer, mechanism, adjust, seeds=seeds)
    savefig(fig, path, pdf=True)
    table.to_csv(csv)
    return path, table


def adam_figure(profile: str, datasets, optimizer: Optional[str] = None,
                mechanism: Optional[str] = None, seeds: Optional[int] = None):
    """Figure 4 (App. E.1): :func:`summary_figure` with the Adam gold standard over the datasets
    of ``datasets`` where it was computed, when Figure 2 was drawn with each dataset's own gold
    standard (``optimizer`` and ``mechanism`` None). Returns (path of the figure, table), or
    (None, why there is no Adam grid)."""
    if optimizer is not None or mechanism is not None:
        chosen = " ".join(p for p in (optimizer, mechanism) if p)
        return None, (f"no separate Adam grid: Figure 2 above already uses the gold standard "
                      f"chosen for every panel ({chosen})")
    adam = gold_datasets(profile, datasets, "adam")
    if not adam:
        return None, "no Adam gold standard in this run (notebook 02 with optimizer='adam')"
    return summary_figure(profile, adam, "adam", seeds=seeds)
