"""Notebook 08's tables from the yardstick runs of :mod:`.yardsticks`: the size-1 check against
notebook 02, the additivity error of group leave-out, each method's summed score against the
group gold, the LDS of every method both ways, the gold's noise ceiling and each method's
fraction of it, and the numbers for ``summary.md`` (:func:`save_summary`)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np

from ... import store
from ...gold import gold_scores
from ...metrics import cosine, curve, mean_se
from ...yardsticks import (LDSRuns, additive_estimate, additivity_error, group_score,
                           noise_ceiling, paired_cosine)
from .gold_runs import gold_settings
from .setup import out_dir

GOLD = "further training (gold)"      # the leave-one-out gold itself as a row of the tables

__all__ = ["GOLD", "size_one_check", "additivity_table", "group_cosine_table", "lds_table",
           "ceiling_tables", "save_summary"]


def _loo_gold(gold, n_seeds: int, adjust: str) -> np.ndarray:
    """Notebook 02's leave-one-out gold a[i, t, j] over its first ``n_seeds`` seeds."""
    return gold_scores(gold["loss_full"], gold["loss_loo"], adjust, seeds=np.arange(n_seeds))


def _by_size(groups) -> dict:
    """{|S|: (row indices into the group runs, positions in L)}."""
    sizes, pos = np.asarray(groups["sizes"]), np.asarray(groups["positions"])
    return {int(k): (np.flatnonzero(sizes == k), pos[sizes == k, :k])
            for k in np.unique(sizes)}


def size_one_check(gold, groups) -> dict:
    """The group runs of size 1 against notebook 02's leave-one-out runs of the same instances
    and seeds: the largest absolute difference of their test losses and of the full runs' (0
    where the engine ran the same arithmetic), and of the gold scores (eq. 17) relative to the
    largest leave-one-out score; None where no group has one instance."""
    S = len(groups["seeds"])
    if not np.array_equal(np.asarray(gold["seeds"])[:S], groups["seeds"]):
        raise ValueError("the group runs' seeds are not the first seeds of the gold standard")
    if 1 not in _by_size(groups):
        return None
    rows, pos = _by_size(groups)[1]
    loo = np.asarray(gold["loss_loo"])[:S, pos[:, 0]]
    here = np.asarray(groups["loss_loo"])[:, rows]
    a = _loo_gold(gold, S, "full")[pos[:, 0]]
    g = gold_scores(groups["loss_full"], here, "full")
    return {"runs": len(rows), "seeds": S,
            "loss": float(np.abs(here - loo).max()),
            "full run": float(np.abs(np.asarray(groups["loss_full"])
                                     - np.asarray(gold["loss_full"])[:S]).max()),
            "score (relative)": float(np.abs(g - a).max() / max(np.abs(a).max(), 1e-300))}


def additivity_table(gold, groups) -> tuple:
    """(eval points after theta^f, {|S|: {"rel_l2": (mean, se), "one_minus_cos": (mean, se)}}
    over the groups of that size, each (T',)): the group gold against the sum of notebook 02's
    leave-one-out gold over the group, both eq. (17) (each run's test loss minus the full run's,
    the only form in which removals can add up) over the group runs' seeds."""
    S = len(groups["seeds"])
    a = _loo_gold(gold, S, "full")
    t = np.asarray(groups["eval_points"])
    keep = slice(1, None) if t[0] == 0 and len(t) > 1 else slice(None)
    out = {}
    for k, (rows, pos) in _by_size(groups).items():
        g = gold_scores(groups["loss_full"], np.asarray(groups["loss_loo"])[:, rows], "full")
        err = additivity_error(g[:, keep], additive_estimate(a[:, keep], pos))
        out[k] = {name: mean_se(v, axis=0) for name, v in err.items()}
    return t[keep], out


def group_cosine_table(gold, groups, scores: dict, t: int = -1):
    """Per |S|: the cosine over that size's groups, per test point (mean and SE over test
    points), between the group gold in eq. (13)'s form -- each group run's test loss minus the
    mean over the groups of its size, as eq. (13) centres over L, so that the shift shared by
    every group of a size drops out -- and each method's summed score, and the leave-one-out
    gold's own sum (eq. 13, row ``GOLD``), at evaluation point index ``t`` of the group runs.
    Returns (mean table, SE table): rows the methods, columns |S|."""
    import pandas as pd
    from ...style import label
    S = len(groups["seeds"])
    a13 = _loo_gold(gold, S, "mean")
    mean, se = {}, {}
    for k, (rows, pos) in _by_size(groups).items():
        if len(rows) < 2:
            continue
        g = gold_scores(None, np.asarray(groups["loss_loo"])[:, rows], "mean")    # (g, T, J)
        per = {GOLD: paired_cosine(g, additive_estimate(a13, pos))[t]}
        per.update({label(m): cosine(g, group_score(s, pos))[t] for m, s in scores.items()})
        for name, c in per.items():
            mean.setdefault(name, {})[k], se.setdefault(name, {})[k] = mean_se(c)
    return pd.DataFrame(mean).T, pd.DataFrame(se).T


def lds_table(gold, ft: LDSRuns, rt: Optional[LDSRuns], scores: dict):
    """The LDS (:func:`fimoda.metrics.lds`: Spearman across the subsets per test point between
    the negated measured change in test loss and the summed score, mean and SE over test
    points) of every method and of the leave-one-out gold (row ``GOLD``, eq. 17 over all of
    notebook 02's seeds at its last evaluation point), against the further-training models
    ``ft`` at their last evaluation point and the re-training models ``rt`` after their last
    epoch (None: not run)."""
    import pandas as pd
    from ...style import label
    cands = {GOLD: _loo_gold(gold, len(gold["seeds"]), "full")[:, -1].T}
    cands.update({label(m): s for m, s in scores.items()})
    rows = {}
    for name, s in cands.items():
        f = ft.lds(s)
        row = {"further-training LDS": f.mean, "further-training se": f.se}
        if rt is not None:
            r = rt.lds(s)
            row.update({"re-training LDS": r.mean, "re-training se": r.se})
        rows[name] = row
    table = pd.DataFrame(rows).T
    table.attrs["derived_from"] = store.derived_from(gold, scores)     # saved with it
    return table


def ceiling_tables(gold, scores: dict, eval_points: int = 8):
    """(the noise ceiling of notebook 02's gold (eq. 13) at ``eval_points`` evaluation points
    spread over further training, first and last included: mean and SE over test points, and
    the seeds a ceiling of 0.9 would need (median over test points); each method's mean cosine
    at the last evaluation point, the ceiling there and their ratio), or None for a gold
    standard of one seed (the ceiling compares seeds)."""
    import pandas as pd
    from ...style import label
    if len(gold["seeds"]) < 2:
        return None
    nc = noise_ceiling(gold["loss_full"], gold["loss_loo"], "mean", gold["eval_points"])
    t = np.asarray(gold["eval_points"])
    first = 1 if t[0] == 0 and len(t) > 1 else 0
    idx = np.unique(np.round(np.linspace(first, len(t) - 1, eval_points)).astype(int))
    mean, se = nc.mean()
    need = np.median(nc.seeds_for(0.9)[idx], axis=1)     # inf where a test point has R = 0
    points = pd.DataFrame({"ceiling": mean[idx], "se": se[idx], "seeds for 0.9": need},
                          index=pd.Index(t[idx], name="eval point"))
    a = gold_scores(gold["loss_full"], gold["loss_loo"], "mean")
    frac = {}
    for m, s in scores.items():
        c = cosine(a, s)
        frac[label(m)] = {"cosine": float(curve(a, s)[0][-1]), "ceiling": float(mean[-1]),
                          "cosine / ceiling": float(nc.fraction(c)[-1])}
    return points, pd.DataFrame(frac).T


def save_summary(cfg, optimizer, additivity=None, cosines=None, lds=None, ceiling=None,
                 lora=None, directory=None) -> Path:
    """``yardsticks_summary_<optimizer>.csv`` in the dataset's results: the numbers notebook 05
    puts into ``summary.md`` (:func:`fimoda.paper.report.yardstick_rows`): the additivity error
    (relative L2) per |S| at the last evaluation point, the group cosines at the smallest and
    largest |S|, the LDS of each row both ways, the noise ceiling and cosine / ceiling at the
    last point (the tabular sections, each None where not run), and for ``lora`` (a
    :class:`~.lora_study.LoraStudy`) each rank's cosine to the full gold at the last point, its
    like-for-like time and trainable parameters as fractions of the full gold's, and each
    method's cosine on the adapters to the LoRA gold."""
    import pandas as pd
    from .evaluation import save_table
    opt, _ = gold_settings(cfg, optimizer)
    rows = []
    for k, v in (additivity[1].items() if additivity is not None else ()):
        rows.append({"part": "additivity error (rel. L2, eq. 17)", "what": "group vs sum of LOO",
                     "group size": k, "value": v["rel_l2"][0][-1], "se": v["rel_l2"][1][-1]})
    if cosines is not None:
        mean, se = cosines
        for name in mean.index:
            for k in sorted({min(mean.columns), max(mean.columns)}):     # the extremes of |S|
                rows.append({"part": "group cosine (eq. 13)", "what": name, "group size": k,
                             "value": mean.loc[name, k], "se": se.loc[name, k]})
    for name, r in (lds.iterrows() if lds is not None else ()):
        for way in ("further-training", "re-training"):
            if f"{way} LDS" in r:
                rows.append({"part": f"{way} LDS", "what": name, "value": r[f"{way} LDS"],
                             "se": r[f"{way} se"]})
    if ceiling is not None:
        points, frac = ceiling
        rows.append({"part": "noise ceiling (eq. 13)", "what": "last point",
                     "value": points["ceiling"].iloc[-1], "se": points["se"].iloc[-1]})
        for name, r in frac.iterrows():
            rows.append({"part": "cosine / ceiling", "what": name, "value": r["cosine / ceiling"]})
    if lora is not None:
        m, se = lora.mean()
        for k, r in enumerate(lora.ranks):
            rows += [{"part": "LoRA gold vs full gold (eq. 13)", "what": f"rank {r}",
                      "value": m[k, -1], "se": se[k, -1]},
                     {"part": "LoRA cost / full (like-for-like time)", "what": f"rank {r}",
                      "value": lora.step_seconds[k] / lora.full_step_seconds},
                     {"part": "LoRA trainable / full", "what": f"rank {r}",
                      "value": lora.trainable[k] / lora.full_trainable}]
        for name, (mean_a, se_a, _, _) in lora.method_cosines().items():
            for k, r in enumerate(lora.ranks):
                rows.append({"part": "method on adapters vs LoRA gold (eq. 13)",
                             "what": f"{name}, rank {r}", "value": mean_a[k], "se": se_a[k]})
    path = Path(directory or out_dir(cfg)) / f"yardsticks_summary_{opt}.csv"
    table = pd.DataFrame(rows).assign(optimizer=opt).set_index("part")
    save_table(table, cfg, path.name, directory=path.parent)
    return path
