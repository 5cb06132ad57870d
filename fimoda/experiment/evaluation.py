"""Every method's scores against the gold standard (paper §6.1): cosine and Spearman curves over
the evaluation points after theta^f, the max-cosine table, and notebook 04's comparison of the
leave-out mechanisms."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np

from .. import store
from ..config import ExperimentConfig
from .gold_runs import load_gold
from .setup import out_dir


def evaluation_gold(gold: dict, adjust: str = "mean"):
    """(gold scores a[i, t, j], eval points) without the t = 0 point, where every run is still
    theta^f and all scores are zero."""
    from ..gold import gold_scores
    a = gold_scores(gold["loss_full"], gold["loss_loo"], adjust=adjust)
    t = np.asarray(gold["eval_points"])
    if t[0] == 0 and len(t) > 1:
        return a[:, 1:], t[1:]
    return a, t


def evaluate(gold: dict, scores: dict, adjust: str = "mean"):
    """(eval points, {method: cosine (mean, se)}, {method: Spearman (mean, se)}, table): every
    method's scores against the gold standard -- eq. (13) with ``adjust="mean"``, eq. (17) with
    ``"full"`` -- per test point over the left-out set, averaged over test points, at every
    evaluation point after theta^f; the table is :func:`evaluation_table` of them."""
    from ..metrics import curve
    a, t = evaluation_gold(gold, adjust)
    cos = {m: curve(a, s, "cosine") for m, s in scores.items()}
    sp = {m: curve(a, s, "spearman") for m, s in scores.items()}
    table = evaluation_table(t, cos, sp)
    table.attrs["derived_from"] = store.derived_from(gold, scores)     # saved with it
    return t, cos, sp, table


def evaluation_table(eval_points, cos: dict, sp: dict):
    """Per method: max mean cosine, the eval point where it peaks, cosine at the first and last
    eval points, and the max mean Spearman."""
    import pandas as pd
    from ..plots import label
    rows = []
    for m, (mean, se) in cos.items():
        t = int(np.argmax(mean))
        rows.append({"method": label(m), "max cosine": mean[t], "se": se[t],
                     "at": eval_points[t], "cosine first": mean[0],
                     "cosine last": mean[-1], "max Spearman": float(np.max(sp[m][0]))})
    return pd.DataFrame(rows).set_index("method").sort_values("max cosine", ascending=False)


def save_table(table, cfg: ExperimentConfig, name: str, directory=None) -> Path:
    """Write a pandas table as CSV (atomically) next to the results, with a store record
    (:func:`fimoda.store.write_record`) naming the stored results it was derived from
    (``table.attrs["derived_from"]``: {file: sha256}, set by :func:`evaluate`) and the
    experiment, so a table never outlives, unnoticed, the gold standard or scores behind it."""
    from ..io import atomic_write
    from .records import config_without
    path = Path(directory or out_dir(cfg)) / name
    atomic_write(path, lambda fh: fh.write(table.to_csv().encode()))
    store.write_record(path, {"derived_from": table.attrs.get("derived_from", {}),
                              "experiment": config_without(cfg, "methods")},
                       what=f"table {name} of {cfg.dataset}")
    return path


def mechanism_curves(cfg: ExperimentConfig, optimizer: Optional[str], scores: dict,
                     adjust: str = "mean", methods=("grad_dot", "cg", "lissa")):
    """(eval points, {mechanism: {method: (mean, se) cosine curve}}) for every leave-out
    mechanism whose gold standard with ``optimizer`` has been computed (notebook 04's side-by-side
    comparison of ``remove`` and ``subtract``)."""
    from ..gold import MECHANISMS
    from ..metrics import curve
    out, t = {}, None
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
    return t, out
