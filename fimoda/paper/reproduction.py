"""The reproduction report: the paper's qualitative claims (§6.2, App. E) checked on our own
results at the paper's settings, and how far a different theta^f moves every cosine.

``python -m fimoda.paper.reproduction`` (``./run_all.sh --reproduce``) runs the pipeline at the
paper's settings for Concrete and Energy with 10 further-training seeds (the paper's seed study: 10
seeds reach about 97 % of its 100-seed cosines), retrains theta^f from two more init seeds on
Energy (5 seeds each), and writes ``reproduction/``: the evaluation CSVs, the summary, the figures
as PNG and ``README.md`` with every claim marked reproduced or not, with our number. Nothing here
computes a score: it reads what the notebooks saved (and, for the spread, calls the same experiment
steps the notebooks call).
"""
from __future__ import annotations

import argparse
import dataclasses
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np

from ..io import atomic_write, figures_dir, results_dir

ROOT = Path(__file__).resolve().parent.parent.parent
OUT = ROOT / "reproduction"
REPRODUCTION_DATASETS = ("concrete", "energy")   # the datasets the reproduction runs
SEEDS = 10                   # further-training seeds of the reproduction (the paper: 100)
SPREAD_DATASET = "energy"
SPREAD_INIT_SEEDS = (0, 1, 2)  # theta^f's init and batch-order seed (TrainConfig.seed)
SPREAD_SEEDS = 5             # further-training seeds per theta^f in the spread
# what "flat or rising", "near zero" and "nearly uncorrelated" mean below, in cosine units
FLAT_TOL = 0.02
NEAR_ZERO = 0.1
UNCORRELATED = 0.2
MUTUAL_DATAINF = 0.95        # the paper: cos(DataInf, Grad-Dot) > 0.95


# ----------------------------------------------------------------------------- the claims
def _curves(gold: dict, scores: dict) -> tuple[np.ndarray, dict]:
    """(eval points, {method: mean cosine per eval point}) against eq. (13)."""
    from . import experiment as ex
    t, cos, _, _ = ex.evaluate(gold, scores, "mean")
    return t, {m: v[0] for m, v in cos.items()}


def _claim(name: str, holds: Optional[bool], number: str) -> dict:
    status = "n/a" if holds is None else ("reproduced" if holds else "not reproduced")
    return {"claim": name, "status": status, "ours": number}


def check_claims(cfg, gold: dict, scores: dict) -> list[dict]:
    """Each qualitative claim of the paper (§6.2, App. E) on one dataset's results: whether it
    holds here, and the numbers it rests on (mean cosine over test points, eq. 13)."""
    from . import experiment as ex
    from ..metrics import method_agreement
    t, c = _curves(gold, scores)
    mx = {m: float(v.max()) for m, v in c.items()}
    first = {m: float(v[0]) for m, v in c.items()}
    last = {m: float(v[-1]) for m, v in c.items()}
    unit = ex.eval_unit(cfg)
    out = []

    if "grad_dot" in c:
        gd = c["grad_dot"]
        others = {m: v for m, v in first.items() if m not in ("grad_dot", "datainf")}
        best = max(others, key=others.get) if others else None
        holds = (not others or first["grad_dot"] >= others[best]) and last["grad_dot"] < gd.max()
        out.append(_claim(
            "Grad-Dot starts highest (DataInf aside) and decays", holds,
            f"first {first['grad_dot']:.3f}" + (f" (best other: {best} {others[best]:.3f})"
                                                 if best else "")
            + f", max {gd.max():.3f} at {unit} {int(t[int(np.argmax(gd))])}, last "
              f"{last['grad_dot']:.3f}"))
    if {"grad_dot", "grad_cos"} <= set(c):
        out.append(_claim("Grad-Cos below Grad-Dot", mx["grad_cos"] < mx["grad_dot"],
                          f"max {mx['grad_cos']:.3f} vs {mx['grad_dot']:.3f}"))
    if {"grad_dot", "datainf"} <= set(c):
        _, M = method_agreement({"datainf": scores["datainf"], "grad_dot": scores["grad_dot"]})
        out.append(_claim(f"DataInf ~ Grad-Dot (their cosine > {MUTUAL_DATAINF})",
                          M[0, 1] > MUTUAL_DATAINF,
                          f"cos(DataInf, Grad-Dot) {M[0, 1]:.3f}; max {mx['datainf']:.3f} vs "
                          f"{mx['grad_dot']:.3f}"))
    ifs = [m for m in ("cg", "lissa") if m in c]
    if ifs and "grad_dot" in c:
        holds = all(last[m] >= first[m] - FLAT_TOL and mx[m] < mx["grad_dot"] for m in ifs)
        out.append(_claim("CG and LiSSA flat or rising, never as high as Grad-Dot", holds,
                          "; ".join(f"{m} first {first[m]:.3f}, last {last[m]:.3f}, max "
                                    f"{mx[m]:.3f}" for m in ifs)))
    if "lissa_h" in c and ifs:
        out.append(_claim("LiSSA-H the worst of CG, LiSSA, LiSSA-H",
                          all(mx["lissa_h"] < mx[m] for m in ifs),
                          f"max LiSSA-H {mx['lissa_h']:.3f}; "
                          + ", ".join(f"{m} {mx[m]:.3f}" for m in ifs)))
    if "trak" in c:
        peak = float(np.abs(c["trak"]).max())
        out.append(_claim(f"TRAK (M = 1) near zero (absolute cosine < {NEAR_ZERO})", peak < NEAR_ZERO,
                          f"largest absolute mean cosine {peak:.3f}"))
    S = gold["loss_full"].shape[0]
    if S >= 2 and c:
        ks, study = ex.seeds_study(gold, scores, adjust="mean")
        # methods whose cosine is not near zero with every seed (TRAK's has nowhere to rise to)
        rises = {m: (float(v[0][0]), float(v[0][-1])) for m, v in study.items()
                 if v[0][-1] > NEAR_ZERO}
        up = [m for m, (a, b) in rises.items() if b > a]
        out.append(_claim("Cosine rises with the number of seeds averaged", len(up) == len(rises),
                          f"{len(up)} of {len(rises)} methods (those above {NEAR_ZERO}) rise "
                          f"from 1 to {ks[-1]} seeds"
                          + (f" (Grad-Dot {rises['grad_dot'][0]:.3f} -> "
                             f"{rises['grad_dot'][1]:.3f})" if "grad_dot" in rises else "")))
    rt = ex.retrain_comparison(cfg, scores)
    if rt is None:
        out.append(_claim("Near-zero cosine to LOO re-training from scratch", None,
                          "no re-training results (notebook 02 with retrain=True)"))
    else:
        v = rt["cosine to re-training"]
        out.append(_claim(f"Near-zero cosine to LOO re-training from scratch (absolute cosine < "
                          f"{UNCORRELATED})", bool((v.abs() < UNCORRELATED).all()),
                          f"largest absolute cosine {v.abs().max():.3f} ({v.abs().idxmax()})"))
    return out


def claims_table(profile: str, datasets, seeds: Optional[int] = None,
                 results: Optional[list] = None):
    """:func:`check_claims` for every dataset of ``datasets`` with results (default gold;
    ``seeds``: the run's further-training seeds where it overrode the profile's; ``results``:
    their :func:`fimoda.paper.experiment.with_results` when the caller has loaded it already)."""
    import pandas as pd
    from . import experiment as ex
    if results is None:
        results = ex.with_results(profile, datasets, seeds=seeds)
    rows = []
    for cfg, gold, scores in results:
        for r in check_claims(cfg, gold, scores):
            rows.append({"dataset": cfg.dataset, **r})
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------- theta^f spread
def _first_seeds(gold: dict, k: int) -> dict:
    """The gold arrays restricted to their first k seeds (runs of seed s do not depend on the
    other seeds, so this is the gold standard that k seeds would have given)."""
    return {**gold, "loss_full": gold["loss_full"][:k], "loss_loo": gold["loss_loo"][:k]}


def theta_spread(dataset: str = SPREAD_DATASET, profile: str = "paper",
                 init_seeds=SPREAD_INIT_SEEDS, seeds: int = SPREAD_SEEDS, device="cpu",
                 methods=None, run_seeds: Optional[int] = None):
    """Each method's cosine to the gold standard (eq. 13, first / max / last mean over test
    points) for final models trained from each of ``init_seeds``, the further training averaged
    over ``seeds`` seeds. The default theta^f (init seed ``TrainConfig.seed``) reuses the
    pipeline's own results (its first ``seeds`` seeds; ``run_seeds``: the seeds that run
    averaged where it overrode the profile's) where present; the others are trained, further
    trained and attributed in ``results/<profile>/<dataset>_theta<k>/``."""
    import pandas as pd
    from . import experiment as ex
    from ..influence import PAPER_METHODS
    from ..training import train_final_model
    methods = list(methods or PAPER_METHODS)
    base = ex.run_config(dataset, profile, seeds=run_seeds)
    rows = []
    for k in init_seeds:
        cfg = dataclasses.replace(
            base, train=dataclasses.replace(base.train, seed=k),
            further=dataclasses.replace(base.further, seeds=seeds))
        default = k == base.train.seed and (ex.out_dir(base) / "final_model.pt").exists()
        d = ex.out_dir(base) if default else results_dir(profile, f"{dataset}_theta{k}")
        if default:
            gold = ex.load_gold(base, directory=d)
            if gold["loss_full"].shape[0] < seeds:
                raise ValueError(f"the {dataset} gold standard in {d} has "
                                 f"{gold['loss_full'].shape[0]} seeds, fewer than {seeds}")
            gold, scores = _first_seeds(gold, seeds), ex.load_scores(base, methods, directory=d)
        else:
            train_final_model(cfg, ex.load_data(cfg), device=device, out_dir=d)
            model, ds = ex.final_model(cfg, device=device, directory=d)
            loo = ex.select_loo_indices(cfg, len(ds.X_train))
            test = ex.select_test_indices(cfg, len(ds.X_test))
            gold = ex.run_gold(model, ds, cfg, loo, test, device=device, directory=d)
            att = ex.make_attributor(model, ds, cfg, loo, test, device=device)
            scores, _ = ex.run_methods(methods, att, cfg, loo, test, directory=d)
        t, c = _curves(gold, scores)
        for m, v in c.items():
            rows.append({"init seed": k, "method": m, "cos first": float(v[0]),
                         "cos max": float(v.max()), "cos last": float(v[-1])})
    return pd.DataFrame(rows)


def spread_summary(spread):
    """Per method: the mean over theta^f of first / max / last cosine, and its range."""
    g = spread.groupby("method", sort=False)
    out = {}
    for col in ("cos first", "cos max", "cos last"):
        out[f"{col} mean"] = g[col].mean()
        out[f"{col} range"] = g[col].max() - g[col].min()
    return __import__("pandas").DataFrame(out)


# ----------------------------------------------------------------------------- the folder
def _commit() -> str:
    try:
        return subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def write_folder(profile: str, datasets, out=OUT, spread=None, command: str = "",
                 wall: Optional[float] = None, seeds: Optional[int] = None,
                 commit: Optional[str] = None) -> Path:
    """``out/``: each dataset's evaluation CSVs, the profile's summary.md, the figures of these
    datasets (and the cross-dataset grids) as PNG, and README.md with the settings, the claims
    table, the paper's printed numbers beside ours, the theta^f spread and an index of the
    figures by the paper's number. ``commit``: the code the results were computed with (default:
    this checkout's)."""
    from . import experiment as ex
    from .config import describe
    from .report import markdown_table, figure_index, summary_rows, write_summary
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    have = ex.with_results(profile, datasets, seeds=seeds)   # each gold file read once, used below
    shutil.copyfile(write_summary(profile, datasets, seeds=seeds, results=have),
                    out / "summary.md")
    figs, index = figures_dir(profile), figure_index(profile)
    copied = {r["name"] for r in index                 # these datasets' files, and the grids
              if r["dataset"] in datasets or r["kind"] in ("figure2", "max_cosine")}
    for name in copied:
        shutil.copyfile(figs / name, out / name)
    for ds in datasets:
        for p in sorted(results_dir(profile, ds).glob("evaluation_*.csv")):
            shutil.copyfile(p, out / f"{ds}_{p.name}")
    lines = ["# Reproduction at the paper's settings", "",
             f"Regenerate with `{command or './run_all.sh --reproduce'}` (commit "
             f"{commit or _commit()}"
             + (f"; {wall / 60:.0f} min on the machine that wrote it" if wall else "") + ").",
             "", "The paper's theta^f is not published: ours is trained by the paper's recipe, "
             "and a different theta^f moves every cosine (the spread below says how far).", "",
             "## Settings", ""]
    for cfg, gold, _ in have:          # the seeds actually averaged, from the gold arrays
        S = int(gold["loss_full"].shape[0])
        lines += ["```", describe(dataclasses.replace(
            cfg, further=dataclasses.replace(cfg.further, seeds=S))), "```", ""]
    claims = claims_table(profile, datasets, seeds, results=have)
    lines += ["## The paper's qualitative claims (§6.2, App. E), on our results", "",
              "Mean cosine over test points between each method and the gold standard (eq. 13, "
              "each dataset's default gold standard).", "",
              markdown_table(claims) if not claims.empty else "(no results)", ""]
    rows = summary_rows(profile, datasets, seeds=seeds, results=have)
    rows = rows[rows["paper first"].notna()] if not rows.empty else rows
    if not rows.empty:
        lines += ["## Beside the paper's printed numbers", "",
                  "Where the reference notebooks printed the mean cosine (eq. 13, 100 seeds) at the "
                  "first and last evaluation point, ours (10 seeds, our theta^f) beside it:", "",
                  markdown_table(rows[["dataset", "method", "paper first", "cos first",
                                       "paper last", "cos last"]]), ""]
    if spread is not None and not spread.empty:
        inits = ", ".join(map(str, sorted(spread["init seed"].unique())))
        lines += [f"## Spread over final models (init seeds {inits})", "",
                  "Each method's mean cosine to the gold standard (eq. 13) for theta^f trained "
                  "from each init seed: the mean over the final models and the range (max - min)."
                  " `theta_spread.csv` has every row.", "",
                  markdown_table(spread_summary(spread).reset_index()), ""]
        spread.to_csv(out / "theta_spread.csv", index=False)
    rows = [r for r in index if r["name"] in copied]
    lines += ["## Figures and tables", "", "| paper | file | shows | settings |",
              "|---|---|---|---|"]
    lines += [f"| {r['paper'] or '—'} | `{r['file'].split('`')[1]}` | {r['shows']} | "
              f"{r['settings']} |" for r in rows]
    lines += ["", "`summary.md`: first / max / last cosine and Spearman per dataset and method "
              "(the paper's values where its notebooks printed them); "
              "`<dataset>_evaluation_*.csv`: notebook 04's tables.", ""]
    path = out / "README.md"
    atomic_write(path, lambda fh: fh.write("\n".join(lines).encode()))
    return path


def main(argv=None):
    """Run the pipeline at the paper's settings for the reproduction's datasets, the theta^f
    spread, and write the folder."""
    from . import pipeline
    ap = argparse.ArgumentParser(description=main.__doc__.splitlines()[0])
    ap.add_argument("--profile", default="paper")
    ap.add_argument("--datasets", default=",".join(REPRODUCTION_DATASETS))
    ap.add_argument("--seeds", type=int, default=SEEDS)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--spread-seeds", type=int, default=SPREAD_SEEDS)
    ap.add_argument("--no-spread", action="store_true", help="skip the theta^f spread")
    ap.add_argument("--out", default=str(OUT))
    a = ap.parse_args(argv)
    datasets = [d for d in a.datasets.split(",") if d]
    command = " ".join(["./run_all.sh --reproduce"] + (argv if argv is not None else sys.argv[1:]))
    t0 = time.perf_counter()
    pipeline.run(a.profile, datasets, a.device, seeds=a.seeds, variants=False,
                 jobs=min(2, len(datasets)) if a.device == "cpu" else 1)
    spread = None
    if not a.no_spread and SPREAD_DATASET in datasets:
        spread = theta_spread(SPREAD_DATASET, a.profile, seeds=a.spread_seeds, device=a.device,
                              run_seeds=a.seeds)
    path = write_folder(a.profile, datasets, a.out, spread, command, time.perf_counter() - t0,
                        seeds=a.seeds)
    print(f"reproduction written to {path.parent}")


if __name__ == "__main__":
    sys.exit(main())
