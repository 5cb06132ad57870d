"""LoRA further training beside the full-parameter gold standard (paper Sec. 7's next step):
the dataset's further training -- the same theta^f, seeds, steps, optimizer, leave-out mechanism,
left-out and test instances -- with only LoRA adapters trained (:mod:`fimoda.lora`), and how
closely its gold scores (eq. 13) point the way of the full-parameter gold's, at every evaluation
point, and what it costs.

:func:`lora_gold` runs (or reuses) one rank's LoRA gold standard,
``lora_gold_r<rank>_<optimizer>_<mechanism>.npz`` beside notebook 02's gold
(:func:`lora_gold_path`), through the result store; :func:`lora_study` does it for several
ranks and compares; :func:`lora_figure` draws the comparison (figure kind ``lora_gold``).
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import pandas as pd
import torch

from ... import store
from ...settings import ExperimentConfig, YardstickConfig
from ..config import yardstick_reductions
from ...io import load_json, load_npz
from ...models import resolve_dtype
from ...lora import BERT_TARGETS, add_lora, lora_settings, n_trainable
from ...metrics import cosine, mean_se
from ...style import themed
from ...gold.scores import gold_scores
from .gold_runs import (eval_unit, gold_config, gold_inputs, gold_path, gold_record,
                        gold_settings, run_gold)
from .assumption1 import ASSUMPTION1_METHODS, assumption1_damping
from .methods import load_scores, make_attributor, method_config, run_method
from .setup import final_model, out_dir, select_loo_indices, select_test_indices, tensors

__all__ = ["LoraStudy", "lora_gold", "lora_gold_path", "lora_study", "adapter_scores",
           "lora_figure", "lora_applies", "lora_runs"]


def lora_gold_path(cfg: ExperimentConfig, rank: int, lr: Optional[float] = None,
                   seeds: Optional[Sequence[int]] = None, directory=None,
                   dtype: Optional[str] = None) -> Path:
    """``<results>/lora_gold_r<rank>[_lr<lr>][_seeds<s1-s2-..>][_<dtype>]_<optimizer>_<mechanism>
    .npz`` (the learning rate, the seeds and the dtype named where they are not the full
    gold's)."""
    optimizer, mechanism = gold_settings(cfg)
    lr_part = "" if lr is None else f"_lr{lr:g}"
    full_seeds = gold_config(cfg, optimizer, mechanism).seed_list
    seed_part = "" if seeds is None or [int(s) for s in seeds] == full_seeds else \
        "_seeds" + "-".join(str(int(s)) for s in seeds)
    dtype_part = "" if dtype is None or dtype == cfg.dtype else f"_{dtype}"
    name = f"lora_gold_r{rank}{lr_part}{seed_part}{dtype_part}_{optimizer}_{mechanism}.npz"
    return Path(directory or out_dir(cfg)) / name


def lora_gold(model, ds, cfg: ExperimentConfig, loo_idx, test_idx, rank: int,
              alpha: Optional[float] = None, seed: int = 0, lr: Optional[float] = None,
              targets: Sequence[str] = BERT_TARGETS, seeds: Optional[Sequence[int]] = None,
              dtype: Optional[str] = None, device="cpu", directory=None,
              reuse: str = "auto") -> dict:
    """The dataset's gold standard (its optimizer, mechanism, seeds, steps) with only rank-``rank``
    LoRA adapters of theta^f (``model``) trained (:func:`fimoda.lora.add_lora` with ``alpha``,
    ``seed``, ``targets``); ``lr``: the learning rate, ``seeds``: the batch-order seeds, when not
    the full gold's; ``dtype``: the precision of the runs ("float64", "float32"; None: the
    dataset's). Kept in the result store beside notebook 02's gold (reused while theta^f,
    the data, the instances, the settings and the environment are these); returns its arrays
    (``loss_full``, ``loss_loo``, ``seeds``, ...)."""
    from ...gold import further_train, save_gold
    optimizer, mechanism = gold_settings(cfg)
    path = lora_gold_path(cfg, rank, lr, seeds, directory, dtype)
    gcfg = gold_config(cfg, optimizer, mechanism, device, **_changed(lr, seeds))
    wrapped, names = add_lora(model, rank, alpha, targets, seed)   # checks before any work
    if dtype is not None:
        wrapped = wrapped.to(resolve_dtype(dtype))      # the data follow the model's dtype
    record = gold_record(cfg, gcfg, lora={"rank": rank, "alpha": float(rank if alpha is None
                                                                   else alpha),
                                          "seed": seed, "targets": list(targets)},
                         dtype=dtype or cfg.dtype)
    inputs = gold_inputs(record, path, model, ds, loo_idx, test_idx)

    def compute():
        Xtr, ytr, Xte, yte = tensors(ds, cfg, device)
        t = torch.as_tensor(test_idx)
        res = further_train(wrapped, cfg.task, Xtr, ytr, Xte[t], yte[t], torch.as_tensor(loo_idx),
                            gcfg, workdir=path.parent / f"work_{path.stem}",
                            test_indices=np.asarray(test_idx), workdir_mismatch="replace")
        save_gold(path, res, {"record": record, "loo_indices": loo_idx, "test_indices": test_idx,
                              "trainable": n_trainable(wrapped), "adapters": names})
        return {"seconds": res.seconds}

    return store.cached(path, inputs, compute, load_npz, device=device, reuse=reuse,
                        what=f"the rank-{rank} LoRA gold standard of {cfg.dataset}",
                        files=[path.with_suffix(".json")])


def _changed(lr, seeds) -> dict:
    """GoldConfig fields that differ from the full gold's: ``lr``, ``seeds`` where given."""
    return {**({} if lr is None else {"lr": lr}),
            **({} if seeds is None else {"seeds": tuple(int(s) for s in seeds)})}


@dataclasses.dataclass(frozen=True)
class LoraStudy:
    """LoRA gold standards against the full-parameter one. ``cosine`` (R, T, J): per rank (in
    ``ranks``' order), evaluation point and test point, the cosine over the left-out set
    between the LoRA and the full gold's eq. 13 scores (NaN at t = 0, theta^f itself, where both
    are zero); ``trainable`` (R,) and ``full_trainable``: parameters trained; ``seconds`` (R,)
    and ``full_seconds``: wall time of each stored gold standard's computation (as recorded,
    under whatever else ran then; the full gold's scaled to the seeds compared);
    ``step_seconds`` (R,) and ``full_step_seconds``: the same short further training (one seed,
    the full run and one left-out run, ``timing_steps`` steps) timed here back to back, the
    like-for-like cost; ``seeds``: the batch-order seeds of both golds compared."""
    dataset: str
    ranks: tuple
    eval_points: np.ndarray
    eval_unit: str
    cosine: np.ndarray
    trainable: np.ndarray
    full_trainable: int
    seconds: np.ndarray
    full_seconds: float
    step_seconds: np.ndarray
    full_step_seconds: float
    timing_steps: int
    lr: float
    seeds: tuple
    dtype: str = ""
    methods: dict = dataclasses.field(default_factory=dict)

    def method_cosines(self) -> dict:
        """Per method of ``methods`` (name -> (adapters (R, T, J), full (T, J)) cosines: the
        method on each rank's adapters against that rank's LoRA gold, and the method on all
        parameters (notebook 03's scores) against the full gold), the (mean, SE) over test points
        at the last evaluation point: name -> (adapters mean (R,), SE (R,), full mean, SE)."""
        out = {}
        for m, (on_adapters, on_full) in self.methods.items():
            mean_a, se_a = mean_se(on_adapters[:, -1], axis=1)
            mean_f, se_f = mean_se(on_full[-1])
            out[m] = (mean_a, se_a, float(mean_f), float(se_f))
        return out

    def method_means(self) -> pd.DataFrame:
        """:meth:`method_cosines` as a table, one row per method and rank."""
        rows = []
        for m, (mean_a, se_a, mean_f, se_f) in self.method_cosines().items():
            for k, r in enumerate(self.ranks):
                rows.append({"method": m, "rank": r,
                             "on adapters vs LoRA gold": round(float(mean_a[k]), 3),
                             "se": round(float(se_a[k]), 3),
                             "on all parameters vs full gold": round(mean_f, 3),
                             "se (all)": round(se_f, 3)})
        return pd.DataFrame(rows)

    def mean(self):
        """(mean, standard error) of the cosine over test points, each (R, T)."""
        return mean_se(self.cosine, axis=2)

    def table(self) -> pd.DataFrame:
        """One row per rank: mean +- SE cosine at the last evaluation point, the trainable
        parameters (and their fraction of the full gold's), and the cost ratios to the full
        gold (stored wall time, and the like-for-like timing)."""
        m, se = self.mean()
        return pd.DataFrame({
            "rank": list(self.ranks),
            f"cosine at {self.eval_unit} {int(self.eval_points[-1])}": m[:, -1].round(3),
            "se": se[:, -1].round(3),
            "trainable": self.trainable,
            "trainable / full": (self.trainable / self.full_trainable).round(4),
            "gold seconds": np.round(self.seconds, 1),
            "gold seconds / full": np.round(self.seconds / self.full_seconds, 2),
            "like-for-like time / full": np.round(self.step_seconds / self.full_step_seconds, 2)})


def _timed(model, cfg, gcfg, ds, loo_idx, test_idx, steps: int, device) -> float:
    """Seconds of one seed's full run and one left-out run over ``steps`` steps."""
    from ...gold import further_train
    Xtr, ytr, Xte, yte = tensors(ds, cfg, device)
    t = torch.as_tensor(test_idx)
    short = dataclasses.replace(gcfg, seeds=(gcfg.seed_list[0],), max_steps=steps,
                                eval_every=steps, progress=False)
    t0 = time.perf_counter()
    further_train(model, cfg.task, Xtr, ytr, Xte[t], yte[t], torch.as_tensor(loo_idx[:1]), short)
    return time.perf_counter() - t0


def lora_study(cfg: ExperimentConfig, ranks: Sequence[int] = (8,), alpha: Optional[float] = None,
               seed: int = 0, lr: Optional[float] = None, seeds: Optional[Sequence[int]] = None,
               timing_steps: int = 2, methods: Sequence[str] = (),
               dtype: Optional[str] = "float64", device="cpu", directory=None, model=None,
               ds=None) -> LoraStudy:
    """The LoRA gold standard of every rank in ``ranks`` (:func:`lora_gold`; ``alpha`` None:
    alpha = rank) against notebook 02's full-parameter gold of ``cfg`` (run here if it is not
    stored), on theta^f and the instances notebook 02 uses (``model``, ``ds``: theta^f and its
    training data when already loaded, :func:`~.setup.final_model`). ``seeds``: some of the full
    gold's seeds (None: all); both golds are then averaged over these only. Cost: one LoRA gold
    standard per rank (``len(seeds)`` seeds), plus ``timing_steps`` steps of two runs per rank
    and once for the full model (the like-for-like timing).

    ``dtype``: the LoRA golds' precision (None: the dataset's). float64 by default: from B = 0
    the adapters' contribution s B A x to a layer's output is orders of magnitude below the
    output itself, and a left-out run's difference in it smaller again, near or below
    float32's resolution of the output, so float32 LoRA runs differ from the full run largely
    by round-off. The full gold is notebook 02's, in the dataset's dtype (whose float32
    precision notebook 02 checks).

    ``methods``: attribution methods to run on each rank's adapters at theta^f
    (:func:`adapter_scores`) and compare with that rank's LoRA gold, beside the same methods on
    all parameters (notebook 03's stored scores) against the full gold."""
    ranks = tuple(ranks)
    if not ranks or len(set(ranks)) != len(ranks):
        raise ValueError(f"ranks must be distinct and at least one, got {ranks}")
    if cfg.model != "text" and model is None:
        raise ValueError("lora_study adapts the encoder's linear layers (a text dataset); for "
                         "another model call fimoda.lora.add_lora with its targets")
    if (model is None) != (ds is None):
        raise ValueError("give both model and ds (theta^f and its training data), or neither")
    for r in ranks:                      # every rank (and alpha) checked before any work
        lora_settings(r, alpha)
    optimizer, mechanism = gold_settings(cfg)
    full_seeds = gold_config(cfg, optimizer, mechanism).seed_list
    seeds = tuple(full_seeds if seeds is None else (int(s) for s in seeds))
    if not seeds or not set(seeds) <= set(full_seeds) or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds {seeds} must be distinct seeds of the full gold's {full_seeds}")
    if model is None:
        model, ds = final_model(cfg, device=device, directory=directory)
    d = Path(directory or out_dir(cfg))
    loo_idx = select_loo_indices(cfg, len(ds.X_train))
    test_idx = select_test_indices(cfg, len(ds.X_test))
    full = run_gold(model, ds, cfg, loo_idx, test_idx, device=device, directory=d)
    full_json = load_json(gold_path(cfg, directory=d).with_suffix(".json"))
    rows = [list(full["seeds"]).index(s) for s in seeds]
    a_full = gold_scores(full["loss_full"][rows], full["loss_loo"][rows], adjust="mean")
    subset = None if list(seeds) == full_seeds else seeds
    gcfg = gold_config(cfg, optimizer, mechanism, device, **_changed(lr, subset))
    cos, trainable, seconds, step_s = [], [], [], []
    full_scores = load_scores(cfg, methods, directory=d) if methods else {}
    missing = [m for m in methods if m not in full_scores]
    if missing:
        raise ValueError(f"no stored scores of {missing} for {cfg.dataset}: run "
                         f"notebooks/03_attribution_methods first")
    on_adapters = {m: [] for m in methods}
    for r in ranks:
        res = lora_gold(model, ds, cfg, loo_idx, test_idx, r, alpha, seed, lr, seeds=subset,
                        dtype=dtype, device=device, directory=d)
        if not np.array_equal(res["eval_points"], full["eval_points"]):
            raise ValueError("the LoRA and the full gold standard have different evaluation "
                             "points")
        a = gold_scores(res["loss_full"], res["loss_loo"], adjust="mean")
        c = np.stack([cosine(a_full[:, t:t + 1, :], a[:, t, :].T)[0] for t in range(a.shape[1])])
        c[0] = np.nan                                  # t = 0: theta^f, both golds are zero
        cos.append(c)
        for m, sc in adapter_scores(model, ds, cfg, loo_idx, test_idx, r, methods, alpha, seed,
                                    device, d).items():
            on_adapters[m].append(cosine(a, sc))
        meta = load_json(lora_gold_path(cfg, r, lr, subset, d, dtype).with_suffix(".json"))
        trainable.append(meta["trainable"])
        seconds.append(meta["seconds"])
        wrapped, _ = add_lora(model, r, alpha, seed=seed)
        step_s.append(_timed(wrapped, cfg, gcfg, ds, loo_idx, test_idx, timing_steps, device))
    full_step = _timed(model, cfg, gcfg, ds, loo_idx, test_idx, timing_steps, device)
    return LoraStudy(cfg.dataset, ranks, np.asarray(full["eval_points"]),
                     eval_unit(cfg), np.stack(cos),
                     np.asarray(trainable), n_trainable(model), np.asarray(seconds, float),
                     float(full_json["seconds"]) * len(seeds) / len(full_seeds),
                     np.asarray(step_s), full_step, timing_steps,
                     float(gcfg.lr), seeds, dtype or cfg.dtype,
                     {m: (np.stack(on_adapters[m]), cosine(a_full, full_scores[m]))
                      for m in methods})


def adapter_scores(model, ds, cfg: ExperimentConfig, loo_idx, test_idx, rank: int,
                   methods: Sequence[str], alpha: Optional[float] = None, seed: int = 0,
                   device="cpu", directory=None) -> dict:
    """{method: scores[test, left-out]} of each of ``methods`` on the rank-``rank`` adapters of
    theta^f (the adapters :func:`lora_gold` trains; ``names=`` the adapter names), with the
    dataset's method settings; stored as ``lora_scores_r<rank>_<method>.npz`` through the result
    store (:func:`~.methods.run_method`). At theta^f B = 0, so the A matrices get no gradient
    and the B matrices get s G A^T: each layer's weight gradient G seen through a random
    projection of its input side. The methods are given the B matrices only: the A matrices'
    gradients are zero at theta^f, so they would add nothing to a score but work (and DataInf's
    warning for every all-zero layer)."""
    if not methods:
        return {}
    wrapped, names = add_lora(model, rank, alpha, seed=seed)
    names = [n for n in names if ".lora_B." in n]           # the A matrices: zero gradient here
    att = make_attributor(wrapped, ds, cfg, loo_idx, test_idx, device, names=names,
                          progress=False)
    out = {}
    for m in methods:
        extra = {}
        if m in ASSUMPTION1_METHODS and \
                getattr(method_config(m, cfg), "hessian", "true") == "true":
            # the adapters' own Hessian; not kept, so notebook 03's lambda_min file stays its own
            extra = {"damping": assumption1_damping(att, cfg)}
        out[m] = run_method(m, att, cfg, loo_idx, test_idx, directory=directory,
                            file=f"lora_scores_r{rank}_{m}.npz", **extra)
    return out


@themed
def lora_figure(study: LoraStudy):
    """Left: the cosine between each rank's LoRA gold and the full-parameter gold (eq. 13),
    mean +- SE over test points, against further training (one curve per rank, the theme's
    palette). Right: each rank's cost relative to the full-parameter gold, trainable parameters
    and like-for-like time, with the full gold (black, the style map's ``gold``) at 1."""
    import matplotlib.pyplot as plt
    from ...style import method_style
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(10.5, 3.9), gridspec_kw={"width_ratios": [3, 2]})
    m, se = study.mean()
    x = study.eval_points[1:]
    for k, r in enumerate(study.ranks):
        line, = ax.plot(x, m[k, 1:], marker="o", label=f"LoRA rank {r}")
        ax.fill_between(x, m[k, 1:] - se[k, 1:], m[k, 1:] + se[k, 1:], alpha=0.2,
                        color=line.get_color(), linewidth=0)
    ax.axhline(0, color="0.6", lw=0.8)
    ax.set_ylim(min(0.0, float(np.nanmin(m[:, 1:] - se[:, 1:])) - 0.05), 1.0)
    ax.set_xticks(x)
    ax.set_xlabel(f"further training ({study.eval_unit}s)")
    ax.set_ylabel("cosine to the full-parameter gold")
    ax.set_title("LoRA gold vs full-parameter gold (eq. 13)")
    ax.legend(loc="lower right")
    idx = np.arange(len(study.ranks))
    w = 0.38
    for shift, values, what in ((-w / 2, study.trainable / study.full_trainable,
                                 "trainable parameters"),
                                (w / 2, study.step_seconds / study.full_step_seconds,
                                 "time (like for like)")):
        bars = bx.bar(idx + shift, values, w, label=what)
        bx.bar_label(bars, fmt="%.2f", fontsize="small")          # a 3 % bar is hard to read
    gold = method_style("gold")
    bx.axhline(1.0, color=gold["color"], lw=1.2, label="full-parameter gold")
    bx.set_xticks(idx, [f"rank {r}" for r in study.ranks])
    bx.set_ylabel("LoRA / full-parameter")
    bx.set_title("cost")
    bx.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2, fontsize="small")
    bx.set_ylim(0, 1.15 * max(1.0, float((study.step_seconds / study.full_step_seconds).max())))
    seeds = ", ".join(map(str, study.seeds))
    said = (f"batch-order seed {seeds}" if len(study.seeds) == 1      # "seeds 1" read as a count
            else f"{len(study.seeds)} batch-order seeds ({seeds})")
    fig.suptitle(f"{study.dataset}: LoRA further training (lr {study.lr:g}, {said}, "
                 f"LoRA runs in {study.dtype})")
    fig.tight_layout()
    return fig


def lora_applies(cfg: ExperimentConfig) -> tuple[bool, str]:
    """(whether notebook 08's LoRA section runs for this dataset, why not): the text encoder,
    whose linear layers the adapters wrap (:mod:`fimoda.lora`)."""
    if cfg.model != "text":
        return False, (f"{cfg.dataset}: LoRA further training adapts the text encoder's linear "
                       f"layers (run this notebook with dataset='sst2'); fimoda.lora.add_lora "
                       f"wraps any other model's layers by name")
    return True, ""


def lora_runs(cfg: ExperimentConfig, ycfg: YardstickConfig, device="cpu"):
    """Notebook 08's LoRA study (:func:`~.lora_study.lora_study`): one LoRA gold standard per
    rank of ``ycfg.lora_ranks`` over the first ``ycfg.lora_seeds`` of the gold's seeds, against
    notebook 02's full-parameter gold over the same seeds, and ``ycfg.lora_methods`` on the
    adapters. Returns (the :class:`~.lora_study.LoraStudy`, the settings that differ from the
    profile's full ones as printable lines)."""
    full = gold_config(cfg, *gold_settings(cfg)).seed_list
    seeds = full[:ycfg.lora_seeds] if ycfg.lora_seeds else full
    changed = [r for r in yardstick_reductions(ycfg, cfg.profile)
               if r.startswith("lora_") and not r.startswith("lora_seeds")]   # said below
    if len(seeds) < len(full):
        changed.append(f"LoRA gold: the first {len(seeds)} of the gold standard's {len(full)} "
                       f"seeds, the full gold compared over the same")
    return lora_study(cfg, ranks=ycfg.lora_ranks, seeds=seeds, methods=ycfg.lora_methods,
                      device=device), changed
