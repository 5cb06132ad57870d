"""The experiment of paper §6.1 for one dataset, as steps the notebooks call in order:
choose the left-out and test instances, train/load theta^f, run the gold standard, run every
approximation, evaluate. Each step reads and writes ``results/<profile>/<dataset>/``.
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Iterable, Optional

import numpy as np
import torch

from .config import ExperimentConfig
from .io import load_json, load_npz, results_dir, save_json, save_npz
from .models import resolve_dtype


# ----------------------------------------------------------------------------- instances
def setup(dataset: str, profile: str, data_dir=None, dtype: Optional[str] = None,
          seeds: Optional[int] = None):
    """What every per-dataset notebook starts with: ``$FIMODA_DATA_DIR`` set from ``data_dir``
    (if given), the dataset's config under ``profile`` (``dtype`` overriding the dataset's,
    ``seeds`` the number of further-training seeds), its banner printed (stand-ins,
    gold-standard settings, reductions), and the profile's figures folder. Returns (cfg,
    figures folder)."""
    import os
    from .config import describe, get_config
    from .io import figures_dir
    if data_dir:
        os.environ["FIMODA_DATA_DIR"] = str(data_dir)
    cfg = get_config(dataset, profile, **({"dtype": dtype} if dtype else {}))
    if seeds is not None:
        if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
            raise ValueError(f"seeds must be an integer >= 1, got {seeds!r}")
        cfg = dataclasses.replace(cfg, further=dataclasses.replace(cfg.further, seeds=seeds))
    print(describe(cfg))
    return cfg, figures_dir(profile)


def select_loo_indices(cfg: ExperimentConfig, n_train: int) -> np.ndarray:
    """The left-out set L (paper §6.1, issue table): every ``loo_stride``-th training index for
    the regression sets (Energy also takes the last index 690, giving 100), otherwise a fixed
    random subset drawn with seed 0. Reduced profiles keep the first ``n_loo`` of these."""
    fc = cfg.further
    if fc.n_loo > n_train:
        raise ValueError(f"n_loo={fc.n_loo} exceeds the {n_train} training instances")
    if fc.loo_selection == "stride":
        idx = list(range(0, n_train, fc.loo_stride))
        if cfg.dataset == "energy" and len(idx) < 100:
            idx.append(n_train - 1)
        idx = np.asarray(idx[: fc.n_loo], dtype=np.int64)
    elif fc.loo_selection == "random":
        idx = np.sort(np.random.RandomState(0).choice(n_train, fc.n_loo, replace=False))
    else:
        raise ValueError(f"unknown loo_selection {fc.loo_selection!r}")
    if len(idx) < fc.n_loo:
        raise ValueError(f"stride {fc.loo_stride} over {n_train} gives only {len(idx)} instances")
    return idx.astype(np.int64)


def select_test_indices(cfg: ExperimentConfig, n_test: int) -> np.ndarray:
    """All test instances, the first ``n_test``, or a random (seed 0) subset of that size."""
    fc = cfg.further
    if fc.n_test is None or fc.n_test >= n_test:
        return np.arange(n_test, dtype=np.int64)
    if fc.test_selection == "first":
        return np.arange(fc.n_test, dtype=np.int64)
    if fc.test_selection == "random":
        return np.sort(np.random.RandomState(0).choice(n_test, fc.n_test, replace=False))
    raise ValueError(f"unknown test_selection {fc.test_selection!r}")


def tensors(ds, cfg: ExperimentConfig, device="cpu"):
    """(X_train, y_train, X_test, y_test) as tensors in the config's dtype on ``device``
    (integer inputs such as token ids stay integer; class labels are int64)."""
    dtype = resolve_dtype(cfg.dtype)

    def x(a):
        t = torch.as_tensor(np.asarray(a))
        return (t.to(dtype) if t.is_floating_point() else t).to(device)

    def y(a):
        t = torch.as_tensor(np.asarray(a))
        return (t.to(dtype) if cfg.task == "regression" else t.long()).to(device)

    return x(ds.X_train), y(ds.y_train), x(ds.X_test), y(ds.y_test)


def out_dir(cfg: ExperimentConfig, root=None) -> Path:
    return results_dir(cfg.profile, cfg.dataset, root)


# ----------------------------------------------------------------------------- methods
def method_config(name: str, cfg: ExperimentConfig, **overrides):
    """The config dataclass of method ``name`` filled from ``cfg.methods`` (the paper's
    settings for the dataset), then ``overrides``."""
    from .influence import get_method
    _, cls = get_method(name)
    m = cfg.methods
    scale = m.lissa_h_scale if name == "lissa_h" else m.lissa_scale
    candidates = dict(
        damping_grid=m.damping_grid, damping_index=m.damping_index,
        depth=m.lissa_h_depth if name == "lissa_h" else m.lissa_depth, repeat=m.lissa_repeat,
        scale=scale, scale_grid=tuple(s for s in m.lissa_scale_grid if s >= scale),
        batch_size=m.lissa_h_batch_size if name == "lissa_h" else m.lissa_batch_size,
        proj_dim=m.trak_proj_dim, c_grid=m.datainf_c_grid, c_index=m.datainf_index,
        n_samples=m.datainf_samples, rank=m.arnoldi_rank, n_iter=m.arnoldi_iter,
        memory_gb=m.memory_gb,
    )
    if name == "ekfac":
        candidates.pop("batch_size")
    if name not in ("lissa", "lissa_h"):     # e.g. grad_dot's ``scale`` is a flag, not LiSSA's
        candidates.pop("scale")
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs = {k: v for k, v in candidates.items() if k in fields}
    kwargs.update(overrides)
    return cls(**kwargs)


def fit_rows(cfg: ExperimentConfig, n_train: int, loo_idx) -> np.ndarray:
    """The training rows the methods' training-set-wide quantities are estimated on: all of
    them, or (``cfg.methods.fit_rows = m``) the left-out rows plus a seed-0 random sample of the
    others, m in all, sorted. Mean-risk operators over them are unbiased estimates of the full
    set's."""
    m = cfg.methods.fit_rows
    if m is None or m >= n_train:
        return np.arange(n_train, dtype=np.int64)
    loo = np.unique(np.asarray(loo_idx, dtype=np.int64))
    if m < len(loo):
        raise ValueError(f"methods.fit_rows={m} is smaller than the {len(loo)} left-out rows")
    others = np.setdiff1d(np.arange(n_train, dtype=np.int64), loo)
    extra = np.random.RandomState(0).choice(others, m - len(loo), replace=False)
    return np.sort(np.concatenate([loo, extra]))


def make_attributor(model, ds, cfg: ExperimentConfig, loo_idx, test_idx, device="cpu",
                    names: Optional[Iterable[str]] = None, progress: bool = True):
    """The compute-once state of every method: theta^f, the training set for Hessian
    operators (:func:`fit_rows` of it), the left-out and test instances."""
    from .gradients import Problem
    from .influence import Attributor
    Xtr, ytr, Xte, yte = tensors(ds, cfg, device)
    rows = torch.as_tensor(fit_rows(cfg, len(Xtr), loo_idx))
    problem = Problem(model, Xtr[rows], ytr[rows], cfg.task, names=names,
                      chunk=cfg.methods.grad_chunk, progress=progress)
    loo, test = torch.as_tensor(loo_idx), torch.as_tensor(test_idx)
    return Attributor(problem, Xtr[loo], ytr[loo], Xte[test], yte[test],
                      loo_rows=torch.searchsorted(rows, loo))


# Methods whose damped TRUE Hessian must be positive definite for their linear solve: their
# damping is raised where needed to satisfy Assumption 1 of the paper, lambda > -lambda_min(H).
ASSUMPTION1_METHODS = ("prop1", "eq16")


def smallest_hessian_eigenvalue(att, n_iter: int = 60, seed: int = 0, path=None,
                                key: Optional[dict] = None) -> float:
    """lambda_min of the mean-loss Hessian H/n at theta^f, by Lanczos (the smallest Ritz value:
    an upper bound that is tight for the extreme eigenvalues after a few dozen steps). Computed
    once per model (Prop. 1 and eq. 16 share it); with ``path`` it is also kept on disk under
    ``key`` (what it depends on), so a rerun whose scores are cached does not recompute it."""
    from .influence.arnoldi import arnoldi_eig
    from .influence.operators import block_products
    mem = ("lambda_min(H/n)", n_iter, seed)
    if mem not in att.shared:
        record = _canon({"n_iter": n_iter, "seed": seed, "n_train": att.n_train, **(key or {})})
        kept = load_json(path) if path is not None and Path(path).exists() else {}
        if kept.get("key") == record:
            att.shared[mem] = float(kept["lambda_min"])
            return att.shared[mem]
        p = att.problem
        mv = lambda v: block_products(p, p.X, p.Y, v[:, None], "true")[:, 0] / att.n_train
        mu, _ = arnoldi_eig(mv, p.n_params, n_iter, seed, p.dtype, p.device, progress=False)
        att.shared[mem] = float(mu.min())
        if path is not None:
            save_json(path, {"key": record, "lambda_min": att.shared[mem]})
    return att.shared[mem]


def assumption1_damping(att, cfg: ExperimentConfig, margin: float = 1.2, directory=None) -> float:
    """max(lambda_G x grid[index], margin x (-lambda_min(H/n))): the configured damping, raised
    just enough for H/n + lambda I to be positive definite (Assumption 1). With ``directory``,
    lambda_min is kept there (``hessian_lambda_min.json``)."""
    from .influence import damping_value
    m = cfg.methods
    lam = damping_value(att, m.damping_grid, m.damping_index)
    path = None if directory is None else Path(directory) / "hessian_lambda_min.json"
    key = None if path is None else {"problem": _fingerprint(att.problem)}
    return max(lam, margin * max(0.0, -smallest_hessian_eigenvalue(att, path=path, key=key)))


def _fingerprint(problem) -> str:
    """sha256 of what a training-set operator depends on: the rows, the labels and theta^f."""
    import hashlib
    h = hashlib.sha256()
    for t in [problem.X, problem.Y] + [problem.params[n] for n in problem.names]:
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


class MethodFailed(RuntimeError):
    """A method's numerics broke down at these settings (LiSSA diverged, CG did not converge,
    or the damped Hessian is not positive definite: Assumption 1 of the paper fails)."""


def run_method(name: str, att, cfg: ExperimentConfig, loo_idx, test_idx, directory=None,
               force: bool = False, file: Optional[str] = None, **overrides) -> np.ndarray:
    """Compute (or load) ``scores_<name>.npz`` (or ``file``) for the experiment. Numerical
    breakdowns are raised as :class:`MethodFailed` with the reason (nothing is written for that
    method)."""
    from .influence import compute_scores
    if name in ASSUMPTION1_METHODS and "damping" not in overrides \
            and getattr(method_config(name, cfg), "hessian", "true") == "true":
        overrides = {**overrides, "damping": assumption1_damping(
            att, cfg, directory=Path(directory or out_dir(cfg)))}
    mcfg = method_config(name, cfg, **overrides)
    record = {"method": name, "method_config": dataclasses.asdict(mcfg),
              "experiment": _without(cfg, "further", "methods")}
    path = Path(directory or out_dir(cfg)) / (file or f"scores_{name}.npz")
    if path.exists() and not force:
        z = load_npz(path)
        if (str(z.get("config")) == _canon(record)
                and np.array_equal(z["loo_indices"], loo_idx)
                and np.array_equal(z["test_indices"], test_idx)):
            return z["scores"]
    from .influence.errors import MethodBreakdown
    t0 = time.perf_counter()
    try:
        scores = np.asarray(compute_scores(name, att, mcfg), dtype=np.float64)
    except MethodBreakdown as e:
        raise MethodFailed(f"{name}: {e}") from e
    wall = time.perf_counter() - t0
    if scores.shape != (len(test_idx), len(loo_idx)):
        raise RuntimeError(f"{name} returned scores of shape {scores.shape}")
    save_npz(path, scores=scores, loo_indices=np.asarray(loo_idx),
             test_indices=np.asarray(test_idx), config=np.asarray(_canon(record)),
             wall_time=np.asarray(wall))
    return scores


def damping_sweep(name: str, att, cfg: ExperimentConfig, loo_idx, test_idx, directory=None):
    """{lambda_G multiple: scores} of method ``name`` at every damping of the config's grid
    (``scores_<name>.npz`` at the configured index, ``scores_<name>_damping<k>.npz`` at the
    others); a damping at which the method breaks down is left out."""
    out = {}
    for k, g in enumerate(cfg.methods.damping_grid):
        try:
            out[float(g)] = run_method(name, att, cfg, loo_idx, test_idx, directory,
                                       file=_sweep_file(cfg, name, k), damping_index=k)
        except MethodFailed:
            continue
    return out


def _sweep_file(cfg: ExperimentConfig, name: str, k: int) -> str:
    """The scores file of ``name`` at damping index k: the method's own at the configured
    index, ``scores_<name>_damping<k>.npz`` at the others."""
    m = cfg.methods
    return f"scores_{name}.npz" if k == m.damping_index % len(m.damping_grid) \
        else f"scores_{name}_damping{k}.npz"


def damping_sweeps(att, cfg: ExperimentConfig, loo_idx, test_idx, directory=None) -> dict:
    """{method: :func:`damping_sweep`} for the config's ``methods.damping_sweep`` (the skipped
    methods left out)."""
    skip = dict(cfg.methods.skip)
    return {m: damping_sweep(m, att, cfg, loo_idx, test_idx, directory)
            for m in cfg.methods.damping_sweep if m not in skip}


def load_damping_sweep(cfg: ExperimentConfig, name: str, directory=None) -> dict:
    """What :func:`damping_sweep` saved: {lambda_G multiple: scores} for the files present."""
    d = Path(directory or out_dir(cfg))
    out = {}
    for k, g in enumerate(cfg.methods.damping_grid):
        p = d / _sweep_file(cfg, name, k)
        if p.exists():
            out[float(g)] = load_npz(p)["scores"]
    return out


def _without(cfg: ExperimentConfig, *parts) -> dict:
    """The config as a dict without the parts that a result does not depend on (a method's
    scores do not depend on the gold standard's settings, and vice versa)."""
    d = cfg.to_dict()
    for p in parts:
        d.pop(p)
    return d


def _canon(obj) -> str:
    import json
    return json.dumps(obj, sort_keys=True, default=str)


def load_scores(cfg: ExperimentConfig, methods: Iterable[str], directory=None) -> dict:
    """{method: scores} for every method whose file exists."""
    d = Path(directory or out_dir(cfg))
    out = {}
    for m in methods:
        p = d / f"scores_{m}.npz"
        if p.exists():
            out[m] = load_npz(p)["scores"]
    return out


def eval_unit(cfg: ExperimentConfig) -> str:
    """"epoch" where further training is evaluated after every epoch (tabular), else "step"."""
    fc = cfg.further
    return "step" if (fc.max_steps is not None or fc.eval_every is not None) else "epoch"


def gold_settings(cfg: ExperimentConfig, optimizer: Optional[str] = None,
                  mechanism: Optional[str] = None) -> tuple[str, str]:
    """(optimizer, leave-out mechanism) of the gold standard: the ones given, else the
    dataset's (``cfg.further``): SGD for the tabular sets and images, AdamW for SST-2; ``remove``
    for the tabular sets (what the reference code that produced the paper's tabular figures did:
    z_i taken out of each epoch's sampler order), ``subtract`` for images and text (paper
    App. D.3 and its SST-2 code)."""
    return optimizer or cfg.further.optimizer, mechanism or cfg.further.mechanism


def load_gold(cfg: ExperimentConfig, optimizer: Optional[str] = None,
              mechanism: Optional[str] = None, directory=None) -> dict:
    optimizer, mechanism = gold_settings(cfg, optimizer, mechanism)
    d = Path(directory or out_dir(cfg))
    p = d / f"gold_{optimizer}_{mechanism}.npz"
    if not p.exists():
        raise FileNotFoundError(f"no gold standard at {p}: run notebooks/02_gold_further_training"
                                f" for {cfg.dataset} ({cfg.profile} profile) first")
    return load_npz(p)


# ----------------------------------------------------------------------------- data and models
def load_data(cfg: ExperimentConfig, data_dir=None):
    """The dataset of ``cfg`` (tokenized with ``cfg.encoder`` for text), as the loader gives it."""
    from .data import load_dataset
    kw = {"encoder": cfg.encoder} if cfg.encoder else {}
    return load_dataset(cfg.dataset, data_dir=data_dir, **kw)


def final_model(cfg: ExperimentConfig, device="cpu", data_dir=None, directory=None):
    """(theta^f, its training data): the saved final model of notebook 01 and the dataset
    restricted to the rows it was trained on (reduced profiles train on a subset; SST-2 holds out
    validation rows), which the gold standard and every method attribute over. A text config with
    ``trainable_layers`` gets the top layers (:class:`fimoda.models.TextTop`) and the dataset
    as features of the frozen trunk below them."""
    from .train import frozen_trunk, load_final_model, training_dataset
    ds = load_data(cfg, data_dir)
    d = directory or out_dir(cfg)
    model = load_final_model(cfg, ds, d, device=device)
    ds = training_dataset(cfg, ds)
    if cfg.trainable_layers is not None:     # the top layers on the frozen trunk's features
        return frozen_trunk(cfg, model, ds, d)
    return model, ds


def dataset_summary(ds) -> dict:
    """Shapes, class balance / target statistics of a dataset (for notebook 00)."""
    row = {"dataset": ds.name + (f" (stand-in for {ds.stand_in_for})" if ds.stand_in_for else ""),
           "task": ds.task, "n_train": len(ds.X_train), "n_test": len(ds.X_test),
           "input shape": tuple(np.asarray(ds.X_train).shape[1:])}
    if ds.task == "classification":
        counts = np.bincount(np.asarray(ds.y_train).astype(int), minlength=ds.n_classes)
        row["class balance (train)"] = np.round(counts / counts.sum(), 3).tolist()
    else:
        row["target mean/std (train)"] = (round(float(np.mean(ds.y_train)), 3),
                                          round(float(np.std(ds.y_train)), 3))
    return row


# ----------------------------------------------------------------------------- gold standard
def run_gold(model, ds, cfg: ExperimentConfig, loo_idx, test_idx, optimizer: Optional[str] = None,
             mechanism: Optional[str] = None, device="cpu", directory=None, **overrides) -> dict:
    """Further training from theta^f for the full set and every left-out set, all seeds
    (``gold_<optimizer>_<mechanism>.npz``); resumes from ``work_gold_*`` if interrupted."""
    from .gold import GoldConfig, further_train, save_gold
    optimizer, mechanism = gold_settings(cfg, optimizer, mechanism)
    d = Path(directory or out_dir(cfg))
    path = d / f"gold_{optimizer}_{mechanism}.npz"
    if optimizer == "adam" and cfg.further.adam_epochs is not None:
        overrides = {"epochs": cfg.further.adam_epochs, **overrides}
    gcfg = GoldConfig.from_experiment(cfg.further, optimizer=optimizer, mechanism=mechanism,
                                      device=device, **overrides)
    record = {"gold": dataclasses.asdict(gcfg), "experiment": _without(cfg, "methods")}
    for k in ("device", "progress", "workers"):     # where and how fast, not what
        record["gold"].pop(k, None)
    if path.exists() and path.with_suffix(".json").exists():
        old = load_json(path.with_suffix(".json"))
        z = load_npz(path)
        if (_canon(old.get("record")) == _canon(record)
                and np.array_equal(z["loo_indices"], loo_idx)
                and np.array_equal(z["test_indices"], test_idx)):
            return z
    Xtr, ytr, Xte, yte = tensors(ds, cfg, device)
    augment = None
    if cfg.model == "resnet9":      # the same augmentation as the final model's training
        import functools
        from .data import augment_images
        fill = ds.extra.get("pad_value")
        augment = functools.partial(augment_images,
                                    fill=0.0 if fill is None else torch.as_tensor(fill))
    t = torch.as_tensor(test_idx)
    result = further_train(model, cfg.task, Xtr, ytr, Xte[t], yte[t], torch.as_tensor(loo_idx),
                           gcfg, workdir=d / f"work_gold_{optimizer}_{mechanism}",
                           augment=augment, test_indices=np.asarray(test_idx))
    save_gold(path, result, {"record": record, "loo_indices": loo_idx, "test_indices": test_idx})
    return load_npz(path)


def run_retrain(ds, cfg: ExperimentConfig, loo_idx, test_idx, device="cpu", directory=None,
                seeds: int = 1) -> dict:
    """LOO re-training from scratch (paper Fig. 11): the final model's algorithm from its
    init, with each left-out instance removed; ``retrain_remove.npz``."""
    from .gold import retrain_loo
    from .models import build_model
    d = Path(directory or out_dir(cfg))
    path = d / "retrain_remove.npz"
    if path.exists():
        z = load_npz(path)
        if np.array_equal(z["loo_indices"], loo_idx) and np.array_equal(z["test_indices"], test_idx):
            return z
    Xtr, ytr, Xte, yte = tensors(ds, cfg, device)
    init = build_model(cfg, n_features=Xtr.shape[1], n_classes=ds.n_classes).to(device)
    t = torch.as_tensor(test_idx)
    result = retrain_loo(init, cfg, Xtr, ytr, Xte[t], yte[t], torch.as_tensor(loo_idx),
                         seeds=seeds, device=device, workdir=d / "work_retrain")
    arrays = {"loss_full": result.loss_full, "loss_loo": result.loss_loo,
              "eval_points": result.eval_points, "param_dist": result.param_dist,
              "loo_indices": np.asarray(loo_idx), "test_indices": np.asarray(test_idx)}
    save_npz(path, **arrays)
    return arrays


def seed_reliability(loss_full, loss_loo, adjust: str = "mean"):
    """[(k, mean cosine between the gold scores of two disjoint groups of k seeds)] at the
    last eval point, for k = 1, 2, 4, ... up to half the seeds."""
    from .gold import seed_group_scores
    S = loss_full.shape[0]
    rows, k = [], 1
    while 2 * k <= S:
        g = seed_group_scores(loss_full, loss_loo, k, adjust=adjust)[:, :, -1, :]  # (G, i, j)
        num = (g[0] * g[1]).sum(0)
        den = np.linalg.norm(g[0], axis=0) * np.linalg.norm(g[1], axis=0)
        rows.append((k, float(np.mean(np.where(den > 0, num / np.where(den > 0, den, 1), 0)))))
        k *= 2
    return rows


def seeds_study(gold: dict, scores: dict, adjust: str = "mean", metric: str = "cosine"):
    """Max over eval points of the mean metric vs the number k of seeds averaged (App. E.1):
    returns (ks, {method: (means, ses)})."""
    from .gold import seed_group_scores
    from .metrics import seeds_study as study
    S = gold["loss_full"].shape[0]
    ks = [k for k in (1, 2, 4, 8, 16, 32, 64, 100) if k <= S]
    if S not in ks:
        ks.append(S)
    groups = {k: seed_group_scores(gold["loss_full"], gold["loss_loo"], k, adjust=adjust)
              for k in ks}
    out = {}
    for m, s in scores.items():
        vals = [study(groups[k], s, metric)[:2] for k in ks]
        out[m] = (np.array([v[0] for v in vals]), np.array([v[1] for v in vals]))
    return ks, out


def evaluation_table(eval_points, cos: dict, sp: dict):
    """Per method: max mean cosine, the eval point where it peaks, cosine at the first and last
    eval points, and the max mean Spearman."""
    import pandas as pd
    from .plots import label
    rows = []
    for m, (mean, se) in cos.items():
        t = int(np.argmax(mean))
        rows.append({"method": label(m), "max cosine": mean[t], "se": se[t],
                     "at": eval_points[t], "cosine first": mean[0],
                     "cosine last": mean[-1], "max Spearman": float(np.max(sp[m][0]))})
    return pd.DataFrame(rows).set_index("method").sort_values("max cosine", ascending=False)


def evaluate(gold: dict, scores: dict, adjust: str = "mean"):
    """(eval points, {method: cosine (mean, se)}, {method: Spearman (mean, se)}, table): every
    method's scores against the gold standard -- eq. (13) with ``adjust="mean"``, eq. (17) with
    ``"full"`` -- per test point over the left-out set, averaged over test points, at every
    evaluation point after theta^f; the table is :func:`evaluation_table` of them."""
    from .metrics import curve
    a, t = evaluation_gold(gold, adjust)
    cos = {m: curve(a, s, "cosine") for m, s in scores.items()}
    sp = {m: curve(a, s, "spearman") for m, s in scores.items()}
    return t, cos, sp, evaluation_table(t, cos, sp)


def save_table(table, cfg: ExperimentConfig, name: str, directory=None) -> Path:
    """Write a pandas table as CSV (atomically) next to the results."""
    from .io import _atomic
    path = Path(directory or out_dir(cfg)) / name
    return _atomic(path, lambda fh: fh.write(table.to_csv().encode()))


def evaluation_gold(gold: dict, adjust: str = "mean"):
    """(gold scores a[i, t, j], eval points) without the t = 0 point, where every run is still
    theta^f and all scores are zero."""
    from .gold import gold_scores
    a = gold_scores(gold["loss_full"], gold["loss_loo"], adjust=adjust)
    t = np.asarray(gold["eval_points"])
    if t[0] == 0 and len(t) > 1:
        return a[:, 1:], t[1:]
    return a, t


def mechanism_curves(cfg: ExperimentConfig, optimizer: Optional[str], scores: dict,
                     adjust: str = "mean", methods=("grad_dot", "cg", "lissa")):
    """(eval points, {mechanism: {method: (mean, se) cosine curve}}) for every leave-out
    mechanism whose gold standard with ``optimizer`` has been computed (notebook 04's side-by-side
    comparison of ``remove`` and ``subtract``)."""
    from .gold import MECHANISMS
    from .metrics import curve
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


def gold_datasets(profile: str, datasets, optimizer: Optional[str] = None,
                  mechanism: Optional[str] = None) -> list:
    """The datasets of ``profile`` among ``datasets`` whose gold standard (:func:`gold_settings`)
    has been computed, in the panel order of the paper's Figure 2."""
    from .config import get_config
    from .plots import fig2_order
    out = []
    for ds in fig2_order(datasets):
        cfg = get_config(ds, profile)
        opt, mech = gold_settings(cfg, optimizer, mechanism)
        if (out_dir(cfg) / f"gold_{opt}_{mech}.npz").exists():
            out.append(ds)
    return out


def with_results(profile: str, datasets, optimizer: Optional[str] = None,
                 mechanism: Optional[str] = None, methods=None) -> list:
    """[(cfg, gold, {method: scores})] for the datasets of ``profile`` whose gold standard
    (:func:`gold_settings`) has been computed, in the panel order of the paper's Figure 2."""
    from .config import get_config
    from .influence import METHODS
    methods = list(methods or [m for m in METHODS if m != "dense"])
    out = []
    for ds in gold_datasets(profile, datasets, optimizer, mechanism):
        cfg = get_config(ds, profile)
        out.append((cfg, load_gold(cfg, optimizer, mechanism), load_scores(cfg, methods)))
    return out


def summary(profile: str, datasets, optimizer: Optional[str] = None,
            mechanism: Optional[str] = None, adjust: str = "mean", methods=None):
    """Figure 2 as a grid over the datasets with results, and the max-cosine table. Each panel
    uses its dataset's gold standard (:func:`gold_settings`; None = the dataset's default).

    Panels follow the paper's order (:func:`fimoda.plots.fig2_order`: concrete, energy, fico,
    folktables/adult, cifar10/fashion_mnist, sst2), lettered (a), (b), ... over the panels drawn,
    up to three per row; the x-axis is in epochs for datasets whose further training is
    evaluated per epoch (tabular) and in steps where the config sets ``further.max_steps`` or
    ``further.eval_every`` (image, text). One legend for the whole figure. The table's columns
    are the datasets in panel order."""
    import matplotlib.pyplot as plt
    import pandas as pd
    from .metrics import curve
    from .plots import curves, grid_shape, label, panel_letter
    have = with_results(profile, datasets, optimizer, mechanism, methods)
    if not have:
        raise FileNotFoundError(f"no gold results for {list(datasets)} in the {profile} profile")
    nrows, ncols = grid_shape(len(have))
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.6 * ncols, 3.8 * nrows), squeeze=False)
    flat = axes.ravel()
    rows = {}
    handles = {}
    for k, (ax, (cfg, gold, scores)) in enumerate(zip(flat, have)):
        a, t = evaluation_gold(gold, adjust)
        res = {m: curve(a, s) for m, s in scores.items()}
        name = cfg.dataset + (f" (stand-in for {cfg.stand_in_for})" if cfg.stand_in_for else "")
        opt, mech = gold_settings(cfg, optimizer, mechanism)
        eq = "" if adjust == "mean" else ", eq. 17"
        curves(ax, t, res, title=f"{panel_letter(k)} {name}\n({opt}, {mech}{eq})")
        ax.set_xlabel(f"further training ({eval_unit(cfg)}s)")
        for h, lab in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(lab, h)
        rows[name] = {label(m): float(np.max(v[0])) for m, v in res.items()}
    for ax in flat[len(have):]:      # the unused cells of the last row
        ax.remove()
    fig.tight_layout()
    if handles:
        fig.legend(list(handles.values()), list(handles), fontsize=8, loc="center left",
                   bbox_to_anchor=(1.0, 0.5), frameon=False)
    return fig, pd.DataFrame(rows)


def grid_name(optimizer: Optional[str] = None, mechanism: Optional[str] = None,
              adjust: str = "mean", kind: str = "figure2") -> str:
    """File stem of a Figure-2-style grid (``kind="figure2"``) or its max-cosine table
    (``"max_cosine"``): the gold optimizer and mechanism when one was chosen for every panel,
    ``eq17`` for eq. (17); e.g. ``figure2`` (Fig. 2), ``figure2_adam`` (Fig. 4),
    ``figure2_eq17`` (Fig. 5)."""
    return "_".join([kind] + [p for p in (optimizer, mechanism) if p]
                    + (["eq17"] if adjust == "full" else []))


def summary_figure(profile: str, datasets, optimizer: Optional[str] = None,
                   mechanism: Optional[str] = None, adjust: str = "mean"):
    """:func:`summary` saved to the profile's figures folder as ``<grid_name>.png`` (+ PDF) and
    its table as ``max_cosine<...>.csv``; returns (path of the figure, table)."""
    from .io import figures_dir
    from .plots import savefig
    fig, table = summary(profile, datasets, optimizer, mechanism, adjust)
    d = figures_dir(profile)
    path = d / f"{grid_name(optimizer, mechanism, adjust)}.png"
    savefig(fig, path, pdf=True)
    table.to_csv(d / f"{grid_name(optimizer, mechanism, adjust, kind='max_cosine')}.csv")
    return path, table


def influential_examples(ds, gold: dict, a: np.ndarray, scores: dict, j: int, t: int = 0,
                         k: int = 1):
    """The k most helpful (most positive) and most harmful (most negative) left-out instances for
    test point j by the gold scores at eval point t (0 = first after theta^f) and by each method,
    with their original rows (paper Table 2)."""
    import pandas as pd
    loo = np.asarray(gold["loo_indices"])
    rows = []

    def add(source, vec):
        order = np.argsort(vec)
        for kind, picks in (("most helpful", order[::-1][:k]), ("most harmful", order[:k])):
            for i in picks:
                row = {"by": source, "kind": kind, "train index": int(loo[i]),
                       "score": float(vec[i])}
                if ds.raw_train is not None:
                    row.update(ds.raw_train.iloc[int(loo[i])].to_dict())
                else:
                    row["target"] = ds.y_train[int(loo[i])]
                rows.append(row)

    add("gold (eq. 13)", a[:, t, j])
    for m, s in scores.items():
        add(m, s[j])
    test_row = {"by": "TEST INSTANCE", "kind": "", "train index": -1, "score": np.nan}
    if ds.raw_test is not None:
        test_row.update(ds.raw_test.iloc[int(gold["test_indices"][j])].to_dict())
    return pd.DataFrame([test_row] + rows)


def mislabel_applies(cfg: ExperimentConfig) -> tuple[bool, str]:
    """(whether notebook 06 runs mislabelled-example detection for ``cfg``, why not)."""
    if cfg.task != "classification":
        return False, "mislabelled-example detection applies to the classification datasets"
    if cfg.model == "resnet9":
        return False, ("the paper ran mislabelled-example detection on the tabular classifiers "
                       "and SST-2, not on images")
    return True, ""


def mislabel_detection(cfg: ExperimentConfig, optimizer: Optional[str] = None,
                       mechanism: Optional[str] = None, device="cpu", trials=None, frac: float = 0.2,
                       directory=None):
    """Mislabelled-example detection (App. E.2): flip the labels of a random ``frac`` of the
    left-out set, further train theta^f for one epoch on the flipped data (all seeds), and take
    the AUC-ROC of minus the test-averaged gold score (eq. 13) for the flipped indicator; the
    same with Grad-Dot on the flipped labels. Mean and standard error over ``trials``."""
    import pandas as pd
    from .gold import GoldConfig, further_train, gold_scores
    from .influence import Attributor, compute_scores
    from .metrics import mean_se, roc_auc
    if cfg.task != "classification":
        raise ValueError("mislabelled-example detection needs a classification dataset")
    trials = trials or cfg.further.mislabel_trials
    optimizer, mechanism = gold_settings(cfg, optimizer, mechanism)
    d = Path(directory or out_dir(cfg))
    model, ds = final_model(cfg, device=device, directory=d)
    loo_idx = select_loo_indices(cfg, len(ds.X_train))
    test_idx = select_test_indices(cfg, len(ds.X_test))
    gcfg = GoldConfig.from_experiment(cfg.further, optimizer=optimizer, mechanism=mechanism,
                                      device=device, epochs=1, max_steps=cfg.further.max_steps,
                                      seeds=cfg.further.mislabel_seeds or cfg.further.seeds)
    # theta^f and the clean data, shared by every trial; a trial only changes labels
    base = make_attributor(model, ds, cfg, loo_idx, test_idx, device=device, progress=False)
    Xtr, ytr, _, _ = tensors(ds, cfg, device)     # the whole training set (not fit_rows)
    loo = torch.as_tensor(loo_idx)
    aucs = {"further training (gold)": [], "Grad-Dot": []}
    for trial in range(trials):
        rng = np.random.RandomState(1000 + trial)
        flip = np.sort(rng.choice(len(loo_idx), int(round(frac * len(loo_idx))), replace=False))
        y = ytr.clone()
        src = torch.as_tensor(loo_idx[flip])
        y[src] = (y[src] + torch.as_tensor(rng.randint(1, ds.n_classes, len(flip)))) % ds.n_classes
        res = further_train(model, cfg.task, Xtr, y, base.X_test, base.Y_test, loo,
                            gcfg, workdir=d / f"work_mislabel_{trial}")
        a = gold_scores(res.loss_full, res.loss_loo, adjust="mean")[:, -1, :].mean(1)
        is_flipped = np.zeros(len(loo_idx), bool)
        is_flipped[flip] = True
        aucs["further training (gold)"].append(roc_auc(-a, is_flipped))
        flipped = Attributor(base.problem, base.X_loo, y[loo], base.X_test, base.Y_test)
        gd = compute_scores("grad_dot", flipped).mean(0)
        aucs["Grad-Dot"].append(roc_auc(-gd, is_flipped))
    out = {k: mean_se(np.array(v)) for k, v in aucs.items()}
    return pd.DataFrame({k: {"AUC mean": m, "se": s, "trials": trials} for k, (m, s) in out.items()}).T


def run_methods(methods, att, cfg: ExperimentConfig, loo_idx, test_idx, directory=None):
    """:func:`run_method` for each method: ({method: scores}, status table with seconds and
    "ok" or the reason a method broke down). Loaded results take ~0 s."""
    import pandas as pd
    scores, status = {}, {}
    skip = dict(cfg.methods.skip)
    for m in methods:
        if m in skip:
            status[m] = {"seconds": 0.0, "status": f"skipped: {skip[m]}"}
            continue
        t0 = time.perf_counter()
        try:
            scores[m] = run_method(m, att, cfg, loo_idx, test_idx, directory=directory)
            status[m] = {"seconds": round(time.perf_counter() - t0, 2), "status": "ok"}
        except MethodFailed as e:
            status[m] = {"seconds": round(time.perf_counter() - t0, 2), "status": f"failed: {e}"}
    return scores, pd.DataFrame(status).T


def retrain_comparison(cfg: ExperimentConfig, scores: dict, directory=None):
    """Cosine (mean, se over test points) between each method's scores and the scores of LOO
    re-training from scratch (eq. 17 after the final epoch, paper Fig. 11); None when notebook 02
    has not been run with ``retrain=True``."""
    import pandas as pd
    from .gold import gold_scores
    from .metrics import cosine, mean_se
    from .plots import label
    p = Path(directory or out_dir(cfg)) / "retrain_remove.npz"
    if not p.exists():
        return None
    z = load_npz(p)
    a = gold_scores(z["loss_full"], z["loss_loo"], adjust="full")[:, -1:, :]
    rows = {}
    for m, s in scores.items():
        mean, se = mean_se(cosine(a, s)[0])
        rows[label(m)] = {"cosine to re-training": float(mean), "se": float(se)}
    return pd.DataFrame(rows).T.sort_values("cosine to re-training", ascending=False)
