"""Every method's scores against the gold standard (paper §6.1): cosine and Spearman curves over
the evaluation points after theta^f, the gold standard's own noise ceiling at the same points,
the max-cosine table, and notebook 04's comparison of the leave-out mechanisms."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np

from ... import store
from ...settings import ExperimentConfig
from .gold_runs import load_gold
from .setup import out_dir


def evaluation_gold(gold: dict, adjust: str = "mean"):
    """(gold scores a[i, t, j], eval points) without the t = 0 point, where every run is still
    theta^f and all scores are zero."""
    from ...gold import gold_scores
    a = gold_scores(gold["loss_full"], gold["loss_loo"], adjust=adjust)
    t = np.asarray(gold["eval_points"])
    if t[0] == 0 and len(t) > 1:
        return a[:, 1:], t[1:]
    return a, t


def evaluation_ceiling(gold: dict, adjust: str = "mean"):
    """The gold standard's noise ceiling (:func:`fimoda.yardsticks.noise_ceiling`: the cosine
    the exact answer would reach against it) per test point at the evaluation points of
    :func:`evaluation_gold` -- the same stored arrays, the same equation (``adjust``), t = 0
    dropped likewise. None where it has one seed or one left-out instance: a ceiling compares
    seeds over the left-out set."""
    from ...yardsticks import noise_ceiling
    loo = np.asarray(gold["loss_loo"])
    if loo.shape[0] < 2 or loo.shape[1] < 2:
        return None
    t = np.asarray(gold["eval_points"])
    nc = noise_ceiling(gold["loss_full"], loo, adjust, t)
    return nc.select(slice(1, None)) if t[0] == 0 and len(t) > 1 else nc


def ceiling_fractions(a: np.ndarray, scores: dict, ceiling) -> dict:
    """{method: its cosine to the gold scores ``a`` as a fraction of the ``ceiling``, per
    evaluation point} (:meth:`fimoda.yardsticks.NoiseCeiling.fraction`: the mean cosine over
    the mean ceiling, about the method's cosine to the exact answer); NaN without a ceiling."""
    from ...metrics import cosine
    if ceiling is None:
        return {m: np.full(a.shape[1], np.nan) for m in scores}
    return {m: ceiling.fraction(cosine(a, s)) for m, s in scores.items()}


def evaluate(gold: dict, scores: dict, adjust: str = "mean"):
    """(eval points, {method: cosine (mean, se)}, {method: Spearman (mean, se)}, table): every
    method's scores against the gold standard -- eq. (13) with ``adjust="mean"``, eq. (17) with
    ``"full"`` -- per test point over the left-out set, averaged over test points, at every
    evaluation point after theta^f; the table is :func:`evaluation_table` of them, with the
    gold standard's noise ceiling (:func:`evaluation_ceiling`)."""
    from ...metrics import curve
    a, t = evaluation_gold(gold, adjust)
    cos = {m: curve(a, s, "cosine") for m, s in scores.items()}
    sp = {m: curve(a, s, "spearman") for m, s in scores.items()}
    nc = evaluation_ceiling(gold, adjust)
    table = evaluation_table(t, cos, sp, nc, ceiling_fractions(a, scores, nc))
    table.attrs["derived_from"] = store.derived_from(gold, scores)     # saved with it
    return t, cos, sp, table


def evaluation_table(eval_points, cos: dict, sp: dict, ceiling=None, fractions=None):
    """Per method: max mean cosine, the eval point where it peaks, cosine at the first and last
    eval points, and the max mean Spearman; then the gold standard's noise ``ceiling`` (mean over
    test points) at the method's peak and the max cosine as a fraction of it (``fractions``:
    :func:`ceiling_fractions`), NaN without a ceiling."""
    import pandas as pd
    from ...style import label
    rows = []
    ceil = ceiling.mean()[0] if ceiling is not None else np.full(len(eval_points), np.nan)
    for m, (mean, se) in cos.items():
        t = int(np.argmax(mean))
        rows.append({"method": label(m), "max cosine": mean[t], "se": se[t],
                     "at": eval_points[t], "cosine first": mean[0],
                     "cosine last": mean[-1], "max Spearman": float(np.max(sp[m][0])),
                     "ceiling at max": ceil[t],
                     "max / ceiling": np.nan if fractions is None else fractions[m][t]})
    return pd.DataFrame(rows).set_index("method").sort_values("max cosine", ascending=False)


def save_table(table, cfg: ExperimentConfig, name: str, directory=None) -> Path:
    """Write a pandas table as CSV (atomically) next to the results, with a store record
    (:func:`fimoda.store.write_record`) naming the stored results it was derived from
    (``table.attrs["derived_from"]``: {file: sha256}, set by :func:`evaluate`) and the
    experiment, so a table never outlives, unnoticed, the gold standard or scores behind it."""
    from ...io import atomic_write
    from .records import config_without
    path = Path(directory or out_dir(cfg)) / name
    atomic_write(path, lambda fh: fh.write(table.to_csv().encode()))
    store.write_record(path, {"derived_from": table.attrs.get("derived_from", {}),
                              "experiment": config_without(cfg, "methods")},
                       what=f"table {name} of {cfg.dataset}")
    return path


def mechanism_curves(cfg: ExperimentConfig, optimizer: Optional[str], scores: dict,
                     adjust: str = "mean", methods=("grad_dot", "cg", "lissa")):
    """(eval points, {mechanism: {method: (mean, se) cosine curve}}, {mechanism: its gold
    standard's noise ceiling (:func:`evaluation_ceiling`)}) for every leave-out mechanism whose
    gold standard with ``optimizer`` has been computed (notebook 04's side-by-side comparison of
    ``remove`` and ``subtract``)."""
    from ...gold import MECHANISMS
    from ...metrics import curve
    out, ceilings, t = {}, {}, None
    for mech in MECHANISMS:
        try:
            gold = load_gold(cfg, optimizer, mech)
        except FileNotFoundError:
            continue
        a, t_m = evaluation_gold(gold, adjust)
        if t is not None and not np.array_equal(t, t_m):
            raise ValueError(f"the {mech} gold standard is evaluated at other points than the "
                             f"{list(out)[0]} one")
        t = t_m
        out[mech] = {m: curve(a, scores[m], "cosine") for m in methods if m in scores}
        ceilings[mech] = evaluation_ceiling(gold, adjust)
    return t, out, ceilings
