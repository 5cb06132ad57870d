"""The reproduction report: every figure by the paper's number (``figures/<profile>/INDEX.md``) and
the numbers behind them (``results/<profile>/summary.md``), with the paper's own values beside
ours where its notebooks printed one for the same setting.

Both are written by notebook 05 from what the other notebooks saved; nothing here computes a
score. What each figure shows, and its settings, are read from its file name by the registry of
figure kinds (:mod:`fimoda.paper.figures`) that the notebooks build the names with.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

import numpy as np

from .figures import KINDS, paper_figure, read_figure_name
from ..io import atomic_write, figures_dir, results_dir

# The paper's values where its reference notebooks (IBM/fimoda) printed them: mean cosine (or
# Spearman) over test points between each method and the gold standard (eq. 13, 100 seeds) at
# the first and the last evaluation point (tabular: after epoch 1 and the last epoch; SST-2: steps
# 6 and 1053). Keyed by dataset, (optimizer, eq, metric); values: {method: (first, last)}. The
# notebooks printed nothing for Concrete or FICO (their saved outputs are Energy's and
# Folktables' runs); Energy's and SST-2's tables were cut by pandas, so no maximum is known.
PAPER_VALUES = {
    "folktables": {      # tabular_classification.ipynb: SGD lr 1e-4, 25 epochs
        ("sgd", 13, "cosine"): {
            "epochs": (1, 25),
            "grad_dot": (0.949, 0.540), "grad_cos": (0.592, 0.355), "datainf": (0.960, 0.660),
            "cg": (0.380, 0.720), "lissa": (0.161, 0.300), "lissa_h": (0.065, 0.113),
            "ekfac": (0.184, 0.277), "trak": (0.036, 0.102),
        },
    },
    "energy": {          # tabular_regression.ipynb: SGD lr 3e-2, 500 epochs
        ("sgd", 13, "cosine"): {
            "epochs": (1, 500),
            "grad_dot": (0.705, 0.163), "grad_cos": (0.503, 0.106), "datainf": (0.702, 0.204),
            "cg": (0.141, 0.356), "lissa": (0.155, 0.378), "lissa_h": (0.001, 0.034),
            "ekfac": (0.253, 0.288), "trak": (-0.000, 0.007),
        },
    },
    "sst2": {            # sst2_bert.ipynb: AdamW lr 1e-6, one epoch (CG and LiSSA-H not run)
        ("adamw", 13, "cosine"): {
            "steps": (6, 1053),
            "grad_dot": (0.300, -0.066), "grad_cos": (0.037, 0.017), "datainf": (0.269, -0.037),
            "lissa": (0.070, -0.056), "ekfac": (0.015, 0.011), "trak": (0.001, -0.000),
        },
        ("adamw", 13, "spearman"): {
            "steps": (6, 1053),
            "grad_dot": (0.295, 0.052), "grad_cos": (0.123, 0.023), "datainf": (0.350, 0.037),
            "lissa": (0.044, 0.016), "ekfac": (0.164, 0.036), "trak": (-0.007, 0.030),
        },
    },
}

__all__ = ["PAPER_VALUES", "NOTEBOOK_OF_KIND", "paper_figure", "figure_index", "paper_order",
           "write_figure_index", "summary_rows", "ceiling_rows", "mislabel_rows", "beyond_rows",
           "yardstick_rows",
           "write_summary"]

# which notebook writes each kind of file (its prefix in fimoda.paper.pipeline.STEPS)
NOTEBOOK_OF_KIND = {k.name: k.notebook for k in KINDS.values()}

# besides the figures and tables: the index itself, and the store records of tables
_NOT_FIGURES = ("INDEX.md",)


def figure_index(profile: str, directory=None) -> list[dict]:
    """One row per figure or table in ``figures/<profile>/``, read from its file name by the
    registry of figure kinds (:func:`fimoda.paper.figures.read_figure_name`): paper figure, file,
    what it shows, settings (dataset, gold optimizer, leave-out mechanism, eq.). PDFs are listed
    with their PNG. Also, for other readers than INDEX.md: ``name`` (the file name), ``kind`` (its
    key in :data:`fimoda.paper.figures.KINDS`), ``notebook`` (the prefix of the notebook that
    writes it) and ``dataset``, ``optimizer``, ``mechanism`` (None where the name has none).

    Any other file (a PDF without such a PNG, a ``.record.json`` without its table, a name no
    kind has) is a ValueError naming it: a figure is never left out of the index unnoticed.
    ``INDEX.md``, hidden files (``.``-prefixed: temporary files of a write in progress) and
    folders are passed over."""
    d = Path(directory) if directory is not None else figures_dir(profile)
    rows = []
    for path in sorted(d.glob("*")):
        if path.name.startswith(".") or path.name in _NOT_FIGURES or not path.is_file():
            continue
        base = (path.with_suffix(".png").name if path.suffix == ".pdf"
                else path.name.removesuffix(".record.json"))
        try:
            kind, settings = read_figure_name(base)
        except ValueError as e:
            raise ValueError(f"{path}: not a file of any figure kind "
                             f"(fimoda.paper.figures.KINDS); remove it, or register its kind. "
                             f"{e}") from None
        if base != path.name:                  # a PNG's PDF, a table's store record
            continue
        pdf = path.with_suffix(".pdf")
        rows.append({"paper": kind.paper_figure(settings),
                     "file": f"`{path.name}`" + (f" (+ `{pdf.name}`)" if pdf.exists() else ""),
                     "shows": kind.shows, "settings": kind.describe(settings),
                     "name": path.name, "kind": kind.name, "notebook": kind.notebook,
                     "dataset": settings.get("dataset"), "optimizer": settings.get("optimizer"),
                     "mechanism": settings.get("mechanism")})
    return rows


def paper_order(row: dict):
    """Sort key of a :func:`figure_index` row: the paper's figures by number, then its other
    numbers (tables, appendix), then files the paper has none for."""
    num = re.search(r"\d+", row["paper"])
    return (0 if row["paper"].startswith("Fig") else 1 if row["paper"] else 2,
            int(num.group()) if num else 99, row["file"])


def write_figure_index(profile: str, directory=None) -> Path:
    """``INDEX.md`` in the profile's figures folder: :func:`figure_index` as a table, figures
    with a paper number first, in the paper's order."""
    d = Path(directory) if directory is not None else figures_dir(profile)
    rows = figure_index(profile, d)
    lines = [f"# Figures of the `{profile}` profile", "",
             "Written by `notebooks/05_summary_figures.ipynb`; every file here is regenerated by "
             "`./run_all.sh`" + ("" if profile == "cpu" else f" --profile {profile}") + ".", "",
             "| paper | file | shows | settings |", "|---|---|---|---|"]
    lines += [f"| {r['paper'] or '—'} | {r['file']} | {r['shows']} | {r['settings']} |"
              for r in sorted(rows, key=paper_order)]
    path = d / "INDEX.md"
    atomic_write(path, lambda fh: fh.write(("\n".join(lines) + "\n").encode()))
    return path


# ----------------------------------------------------------------------------- summary.md
def summary_rows(profile: str, datasets, optimizer: Optional[str] = None,
                 mechanism: Optional[str] = None, adjust: str = "mean", methods=None,
                 seeds: Optional[int] = None, results: Optional[list] = None):
    """Per dataset with results and method: cosine at the first evaluation point after theta^f,
    its maximum and where, the last; Spearman likewise; and the paper's first/last cosine where
    :data:`PAPER_VALUES` has the same dataset and setting (never for a stand-in). Beside the
    cosines, the gold standard's noise ceiling (:func:`fimoda.paper.experiment.evaluation_ceiling`,
    mean over test points) at the method's maximum and the cosine as a fraction of the ceiling
    at the first point and at the maximum (:func:`fimoda.paper.experiment.ceiling_fractions`; NaN
    for a gold standard of one seed). ``results``:
    :func:`fimoda.paper.experiment.with_results` of these settings when the caller has loaded it
    already (``methods`` is then not used); default: loaded here."""
    import pandas as pd
    from .experiment import (ceiling_fractions, eval_unit, evaluation_ceiling, evaluation_gold,
                             gold_settings, with_results)
    from ..metrics import curve
    from ..style import label
    eq = 13 if adjust == "mean" else 17
    rows = []
    if results is None:
        results = with_results(profile, datasets, optimizer, mechanism, methods, seeds)
    for cfg, gold, scores in results:
        ds = cfg.dataset
        opt, mech = gold_settings(cfg, optimizer, mechanism)
        a, t = evaluation_gold(gold, adjust)
        nc = evaluation_ceiling(gold, adjust)
        ceil = nc.mean()[0] if nc is not None else np.full(len(t), np.nan)
        frac = ceiling_fractions(a, scores, nc)
        values = {} if cfg.stand_in_for else PAPER_VALUES.get(ds, {})
        paper, paper_sp = values.get((opt, eq, "cosine"), {}), values.get((opt, eq, "spearman"), {})
        for m, s in scores.items():
            cos, sp = curve(a, s, "cosine")[0], curve(a, s, "spearman")[0]
            kc, ks = int(np.argmax(cos)), int(np.argmax(sp))
            row = {"dataset": ds + (f" ({cfg.stand_in_for} stand-in)" if cfg.stand_in_for else ""),
                   "gold": f"{opt}, {mech}, eq. {eq}", "unit": eval_unit(cfg), "method": label(m),
                   "cos first": cos[0], "first / ceil": frac[m][0], "cos max": cos[kc],
                   "cos max at": int(t[kc]), "ceil at max": ceil[kc], "max / ceil": frac[m][kc],
                   "cos last": cos[-1], "last at": int(t[-1]), "sp first": sp[0],
                   "sp max": sp[ks], "sp max at": int(t[ks]), "sp last": sp[-1],
                   "paper first": np.nan, "paper last": np.nan,
                   "paper sp first": np.nan, "paper sp last": np.nan}
            if m in paper:
                row["paper first"], row["paper last"] = paper[m]
            if m in paper_sp:
                row["paper sp first"], row["paper sp last"] = paper_sp[m]
            rows.append(row)
    return pd.DataFrame(rows)


def ceiling_rows(results: list, adjust: str = "mean", target: float = 0.9):
    """Per dataset of ``results`` (:func:`fimoda.paper.experiment.with_results`): its gold
    standard's seeds and noise ceiling (:func:`fimoda.paper.experiment.evaluation_ceiling`, mean +-
    SE over test points) at the first and last evaluation points after theta^f, its lowest and
    where, and the seeds its gold standard would need for a mean ceiling of ``target`` at the first
    and the last point (:func:`fimoda.yardsticks.seeds_needed`, rounded up). A gold standard of one
    seed has a row with its seeds and NaN ceilings."""
    import pandas as pd
    from .experiment import eval_unit, evaluation_ceiling, evaluation_gold
    from ..yardsticks import seeds_needed
    eq = 13 if adjust == "mean" else 17
    rows = []
    for cfg, gold, _ in results:
        _, t = evaluation_gold(gold, adjust)
        nc = evaluation_ceiling(gold, adjust)
        mean, se = nc.mean() if nc is not None else (np.full(len(t), np.nan),) * 2
        k = int(np.nanargmin(mean)) if np.isfinite(mean).any() else 0
        need = [int(x) if np.isfinite(x) else x        # inf: a ceiling of 0; NaN: none
                for x in np.ceil(seeds_needed(mean[[0, -1]], gold["loss_loo"].shape[0], target))]
        rows.append({"dataset": cfg.dataset, "eq": eq, "seeds": int(gold["loss_loo"].shape[0]),
                     "unit": eval_unit(cfg), "first at": int(t[0]), "ceiling first": mean[0],
                     "se first": se[0], "last at": int(t[-1]), "ceiling last": mean[-1],
                     "se last": se[-1], "lowest": mean[k], "lowest at": int(t[k]),
                     f"seeds for {target:g} (first)": need[0],
                     f"seeds for {target:g} (last)": need[1]})
    return pd.DataFrame(rows)


def mislabel_rows(profile: str, datasets, directory=None):
    """The mislabel-detection AUC tables notebook 06 saved (dataset, detector, mean, se, trials)."""
    import pandas as pd
    d = Path(directory) if directory is not None else figures_dir(profile)
    tables = [f for f in figure_index(profile, d) if f["kind"] == "mislabel_auc"]
    out = []
    for ds in datasets:
        for f in (f for f in tables if f["dataset"] == ds):
            t = pd.read_csv(d / f["name"], index_col=0)
            for det, r in t.iterrows():
                out.append({"dataset": ds, "file": f["name"], "detector": det,
                            "AUC mean": r["AUC mean"], "se": r["se"], "trials": int(r["trials"])})
    return pd.DataFrame(out)


def beyond_rows(profile: str, datasets):
    """The numbers of notebook 07 (``beyond_summary_<optimizer>.csv`` of each dataset, one per
    gold-standard optimizer it ran against): the infinitesimal gold standard's cosines to the
    finite gold and float32 errors, and the trajectory-matched curves beside the paper's methods
    (first, smallest and where, last; max and mean over t)."""
    import pandas as pd
    out = []
    for ds in datasets:
        for path in sorted(results_dir(profile, ds).glob("beyond_summary_*.csv")):
            out.append(pd.read_csv(path).assign(dataset=ds))
    if not out:
        return pd.DataFrame()
    t = pd.concat(out, ignore_index=True)
    return t[["dataset"] + [c for c in t.columns if c != "dataset"]]


def yardstick_rows(profile: str, datasets):
    """The numbers of notebook 08 (``yardsticks_summary_<optimizer>.csv`` of each dataset that
    ran it): additivity error and group cosines per |S|, the LDS both ways, the noise ceiling,
    LoRA further training (:func:`fimoda.paper.experiment.yardsticks.save_summary`)."""
    import pandas as pd
    out = [pd.read_csv(p).assign(dataset=ds) for ds in datasets
           for p in sorted(results_dir(profile, ds).glob("yardsticks_summary_*.csv"))]
    if not out:
        return pd.DataFrame()
    t = pd.concat(out, ignore_index=True)
    if "group size" in t:                       # absent where only the LoRA section ran
        t["group size"] = t["group size"].map(lambda v: "" if pd.isna(v) else str(int(v)))
    return t[["dataset"] + [c for c in t.columns if c != "dataset"]]


def write_summary(profile: str, datasets, optimizer: Optional[str] = None,
                  mechanism: Optional[str] = None, path=None, figures=None,
                  seeds: Optional[int] = None, results: Optional[list] = None) -> Path:
    """``results/<profile>/summary.md``: :func:`summary_rows` for eq. 13 and eq. 17 -- each
    dataset's own gold standard (or ``optimizer``/``mechanism`` where given), then, when none
    was chosen, the Adam gold standard of App. E.1 where it was computed -- and
    :func:`mislabel_rows`, as markdown tables (numbers to 3 decimals; empty where none). Each
    gold standard is read once for both equations; ``results``: the first one's
    :func:`fimoda.paper.experiment.with_results` when the caller has loaded it already."""
    from .experiment import with_results
    path = Path(path) if path is not None else results_dir(profile, "") / "summary.md"
    lines = [f"# Summary of the `{profile}` profile", "",
             "Cosine and Spearman between each method's scores and the gold standard, mean over "
             "test points, at the first evaluation point after theta^f, at their maximum (and "
             "where, in the dataset's unit: epochs for tabular data, steps for images and text) "
             "and at the last. `paper`: the value the paper's reference notebooks printed for "
             "the same dataset and setting (none for a stand-in). Written by notebook 05.", "",
             "Noise ceiling: the cosine the exact answer (the gold standard of infinitely many "
             "seeds) would reach against this gold standard of K seeds, estimated from the "
             "agreement of its seeds (`fimoda.yardsticks.noise_ceiling`), mean over test points: "
             "no method can be expected above it. `ceil at max`: the ceiling where the method's "
             "cosine peaks; `first / ceil`, `max / ceil`: the cosine as a fraction of the "
             "ceiling, about the method's cosine to the exact answer. `seeds for 0.9`: the seeds "
             "a gold standard needs for a ceiling of 0.9 (Spearman-Brown extrapolation, "
             "`fimoda.yardsticks.seeds_needed`). Spearman has no ceiling here: the estimator "
             "corrects inner products of the seeds' score vectors, which rank correlations are "
             "not.", ""]
    golds = [(optimizer, "each dataset's gold standard" if optimizer is None and mechanism is None
              else f"gold standard {optimizer or ''} {mechanism or ''}".strip())]
    if optimizer is None and mechanism is None:
        golds.append(("adam", "Adam gold standard (App. E.1)"))
    for k, (opt, title) in enumerate(golds):
        have = results if k == 0 and results is not None else \
            with_results(profile, datasets, opt, mechanism, seeds=seeds)
        for adjust in ("mean", "full"):
            t = summary_rows(profile, datasets, opt, mechanism, adjust, results=have)
            if t.empty:
                continue
            lines += [f"## {title}, eq. {13 if adjust == 'mean' else 17}", "",
                      "Noise ceiling of each gold standard:", "",
                      markdown_table(ceiling_rows(have, adjust)), "", markdown_table(t), ""]
    b = beyond_rows(profile, datasets)
    if not b.empty:
        lines += ["## Beyond the paper (notebook 07)", "",
                  "Infinitesimal gold standard: cosine to the finite `subtract` gold on identical "
                  "work (and to notebook 02's), float32 relative errors; trajectory-matched "
                  "influence and the damping schedule, each scored at every evaluation point, "
                  "beside the paper's methods (eq. 13).", "", markdown_table(b), ""]
    y = yardstick_rows(profile, datasets)
    if not y.empty:
        lines += ["## Yardsticks of the field (notebook 08)", "",
                  "Group leave-out against the sum of single leave-outs, each method's summed "
                  "score against the group gold, the LDS (higher: the method predicts the "
                  "measured losses better), the gold's noise ceiling, and on the text encoder "
                  "LoRA further training against the full-parameter gold (its cosine, its "
                  "cost, and methods on the adapters against it).", "", markdown_table(y), ""]
    m = mislabel_rows(profile, datasets, figures)
    if not m.empty:
        lines += ["## Mislabelled-example detection (App. E.2.1)", "", markdown_table(m), ""]
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda fh: fh.write("\n".join(lines).encode()))
    return path


def markdown_table(df) -> str:
    """A DataFrame as a GitHub markdown table, floats to 3 decimals, NaN as empty."""
    def cell(v):
        if isinstance(v, (float, np.floating)):
            return "" if np.isnan(v) else f"{v:.3f}"
        return str(v)
    head = "| " + " | ".join(df.columns) + " |"
    rule = "|" + "---|" * len(df.columns)
    body = ["| " + " | ".join(cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join([head, rule] + body)
