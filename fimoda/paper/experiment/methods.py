"""The approximations as runs of the experiment: each method's config filled from the profile,
the compute-once :class:`~fimoda.influence.Attributor` of theta^f, and ``scores_<method>.npz``
computed once and reused while its record (method config, experiment config, instances) matches."""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Iterable, Optional

import numpy as np
import torch

from ...settings import ExperimentConfig
from ... import store
from ...io import load_npz, save_npz
from .assumption1 import ASSUMPTION1_METHODS, assumption1_damping
from .records import config_without, final_model_source
from .setup import out_dir, tensors


METHODS_NOTEBOOK = "notebooks/03_attribution_methods"


def method_config(name: str, cfg: ExperimentConfig, **overrides):
    """The config dataclass of method ``name`` for the experiment: the method's own defaults,
    then the experiment-wide settings its spec takes (``spec.shared``: the damping grid and
    index, the memory budget), the fields its spec derives from the whole config
    (``spec.from_experiment``: the trajectory's further training), the dataset's and profile's
    settings of the method by name (``cfg.methods.settings[name]``), then ``overrides``. An
    unknown method or field is a ValueError naming it."""
    from ...influence import method_spec
    spec = method_spec(name)
    spec.check_fields(overrides)
    fields = {k: getattr(cfg.methods, k) for k in spec.shared}
    if spec.from_experiment is not None:
        fields.update(spec.from_experiment(cfg))
    fields.update(cfg.methods.settings.get(name, {}))
    fields.update(overrides)
    return spec.make_config(**fields)


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
    from ...gradients import Problem
    from ...influence import Attributor
    Xtr, ytr, Xte, yte = tensors(ds, cfg, device)
    rows = torch.as_tensor(fit_rows(cfg, len(Xtr), loo_idx))
    problem = Problem(model, Xtr[rows], ytr[rows], cfg.task, names=names,
                      chunk=cfg.methods.grad_chunk, progress=progress)
    loo, test = torch.as_tensor(loo_idx), torch.as_tensor(test_idx)
    return Attributor(problem, Xtr[loo], ytr[loo], Xte[test], yte[test],
                      loo_rows=torch.searchsorted(rows, loo))


class MethodFailed(RuntimeError):
    """A method's numerics broke down at these settings (LiSSA diverged, CG did not converge,
    or the damped Hessian is not positive definite: Assumption 1 of the paper fails)."""


def scores_path(cfg: ExperimentConfig, name: str, directory=None, file=None) -> Path:
    """``<results>/scores_<name>.npz`` (or ``file``) of the experiment."""
    return Path(directory or out_dir(cfg)) / (file or f"scores_{name}.npz")


def scores_reader_inputs(cfg: ExperimentConfig, name: str, directory) -> dict:
    """What a reader of a method's scores knows they must have been computed from: the method,
    the experiment config but the gold standard's and the methods' settings, and the saved
    theta^f of ``directory`` (where there is one)."""
    return {"method": name, "experiment": config_without(cfg, "further", "methods"),
            **final_model_source(directory)}


def run_method(name: str, att, cfg: ExperimentConfig, loo_idx, test_idx, directory=None,
               force: bool = False, file: Optional[str] = None, reuse: str = "auto",
               **overrides) -> np.ndarray:
    """Compute (or load) ``scores_<name>.npz`` (or ``file``) for the experiment, kept in the
    result store (:func:`fimoda.store.cached`: reused while the method's config, theta^f, the
    rows and instances and the environment are these; ``force``: recompute; ``reuse="only"``:
    refuse instead of computing). Numerical breakdowns, and scores that come out NaN or inf, are
    raised as :class:`MethodFailed` with the reason (nothing is written for that method)."""
    from ...influence import compute_scores
    from ...io import sha256_arrays
    d = Path(directory or out_dir(cfg))
    if name in ASSUMPTION1_METHODS and "damping" not in overrides \
            and getattr(method_config(name, cfg), "hessian", "true") == "true":
        overrides = {**overrides, "damping": assumption1_damping(att, cfg, directory=d)}
    mcfg = method_config(name, cfg, **overrides)
    record = {"method": name, "method_config": dataclasses.asdict(mcfg),
              "experiment": config_without(cfg, "further", "methods")}
    path = scores_path(cfg, name, d, file)
    p = att.problem
    inputs = {**record, **final_model_source(d),
              "theta": sha256_arrays(*[p.params[n] for n in p.names]),
              "fit_rows": sha256_arrays(p.X, p.Y),
              "left_out": sha256_arrays(att.X_loo, att.Y_loo),
              "test": sha256_arrays(att.X_test, att.Y_test),
              "loo_indices": np.asarray(loo_idx).tolist(),
              "test_indices": np.asarray(test_idx).tolist()}

    def compute():
        from ...influence.errors import MethodBreakdown
        t0 = time.perf_counter()
        try:
            scores = np.asarray(compute_scores(name, att, mcfg), dtype=np.float64)
        except MethodBreakdown as e:
            raise MethodFailed(f"{name}: {e}") from e
        wall = time.perf_counter() - t0
        if scores.shape != (len(test_idx), len(loo_idx)):
            raise RuntimeError(f"{name} returned scores of shape {scores.shape}")
        if not np.isfinite(scores).all():
            raise MethodFailed(f"{name}: {int((~np.isfinite(scores)).sum())} of its "
                               f"{scores.size} scores are NaN or inf (nothing saved)")
        save_npz(path, scores=scores, loo_indices=np.asarray(loo_idx),
                 test_indices=np.asarray(test_idx), wall_time=np.asarray(wall))
        return {"wall_time_s": wall}

    return store.cached(path, inputs, compute, lambda q: load_npz(q)["scores"], device=p.device,
                        what=f"the {name} scores of {cfg.dataset}",
                        reuse="never" if force else reuse,
                        rerun=f"{METHODS_NOTEBOOK} for {cfg.dataset}")


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



def load_scores(cfg: ExperimentConfig, methods: Iterable[str], directory=None) -> dict:
    """{method: scores} for every method whose file exists (a :class:`fimoda.store.Sourced`
    dict naming each file and its sha256), after checking that each file's
    record says it was computed for ``cfg`` (its experiment config but the gold standard's and
    the methods' settings) from the theta^f saved beside it: :class:`~.records.StaleResult`
    naming what differs otherwise, :class:`fimoda.io.UnreadableFile` for a corrupt file."""
    d = Path(directory or out_dir(cfg))
    out = store.Sourced()
    for m in methods:
        p = scores_path(cfg, m, d)
        if p.exists():
            store.check(p, scores_reader_inputs(cfg, m, d),
                        f"{METHODS_NOTEBOOK} for {cfg.dataset} ({cfg.profile} profile)")
            out[m] = load_npz(p)["scores"]
            out.sources[p.name] = store.source(p)["sha256"]
    return out
