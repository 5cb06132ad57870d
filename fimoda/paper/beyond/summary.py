"""The numbers of notebook 07 that notebook 05 puts into ``summary.md``."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np

from .. import experiment as ex
from ...style import label


def save_summary(cfg, inf: Optional[dict], traj: Optional[dict], directory=None) -> Path:
    """``beyond_summary_<optimizer>.csv`` in the dataset's results (the gold standard's optimizer:
    the SGD and Adam runs of notebook 07 each keep theirs): the numbers notebook 05 puts into
    ``summary.md`` (:func:`fimoda.paper.report.beyond_rows`)."""
    import pandas as pd
    opt = (traj or inf or {}).get("optimizer") or ex.gold_settings(cfg)[0]
    rows = []
    if inf is not None:
        for name, (mean, _) in inf["curves"].items():
            k = int(np.argmin(mean))
            rows.append({"part": "infinitesimal gold", "what": name, "first": mean[0],
                         "min": mean[k], "min at": int(inf["eval_points"][k]), "last": mean[-1]})
        for name, e in inf["errors"].items():
            k = int(np.argmin(e))
            rows.append({"part": "float32", "what": f"relative error, {name}", "first": e[0],
                         "min": float(e[k]), "min at": int(inf["eval_points"][k]), "last": e[-1]})
    if traj is not None:
        for m, (mean, _) in traj["curves"].items():
            k = int(np.argmin(mean))
            rows.append({"part": "trajectory", "what": label(m), "first": mean[0],
                         "min": mean[k], "min at": int(traj["eval_points"][k]), "last": mean[-1],
                         "max": float(np.max(mean)), "mean": float(np.mean(mean))})
    path = Path(directory or ex.out_dir(cfg)) / f"beyond_summary_{opt}.csv"
    table = pd.DataFrame(rows).assign(optimizer=opt).set_index("part")
    ex.save_table(table, cfg, path.name, directory=path.parent)
    return path
