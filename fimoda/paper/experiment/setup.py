"""What every per-dataset notebook starts with: the dataset's config and banner (:func:`setup`),
its data and the final model theta^f with the rows it was trained on (:func:`final_model`), the
left-out set L and the test instances (paper §6.1), and the experiment's results folder."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

import numpy as np

from ...settings import ExperimentConfig
from ...io import results_dir
from ...models import resolve_dtype
from ...tensors import as_inputs, as_targets


def setup(dataset: str, profile: str, data_dir=None, dtype: Optional[str] = None,
          seeds: Optional[int] = None, optimizer: Optional[str] = None,
          mechanism: Optional[str] = None):
    """What every per-dataset notebook starts with: ``$FIMODA_DATA_DIR`` set from ``data_dir``
    (if given), the dataset's config under ``profile`` (``dtype`` overriding the dataset's,
    ``seeds`` the number of further-training seeds), its banner shown (a table in a notebook,
    text elsewhere: :mod:`fimoda.paper.banner`), and the profile's figures folder. Returns (cfg,
    figures folder). ``optimizer`` / ``mechanism``: the gold standard this notebook runs, when
    not the dataset's (a variant of the pipeline, e.g. Adam or ``subtract``): the banner's gold
    standard row shows it; the returned config is the dataset's."""
    import os
    from ..banner import show_banner
    from ...io import figures_dir
    if data_dir:
        os.environ["FIMODA_DATA_DIR"] = str(data_dir)
    cfg = run_config(dataset, profile, dtype, seeds)
    show_banner(cfg, optimizer, mechanism)
    return cfg, figures_dir(profile)



_IPYTHON_NAMES = {"In", "Out", "exit", "quit", "get_ipython", "open"}


def check_parameters(declared, namespace: dict) -> None:
    """One ValueError naming every parameter papermill passed that the notebook's parameters
    cell does not define (papermill itself only warns, and the misspelled value would be
    silently ignored). ``declared``: the names that existed when the parameters cell ended
    (``PARAMETERS = set(dir())`` as its last line); ``namespace``: the notebook's ``globals()``
    when the check runs, before anything else is assigned. Modules, functions and classes
    (imports) and private names are not parameters."""
    import inspect
    unknown = sorted(k for k, v in namespace.items()
                     if k not in declared and not k.startswith("_") and k != "PARAMETERS"
                     and not (inspect.ismodule(v) or callable(v)))
    if unknown:
        known = sorted(k for k in declared if not k.startswith("_") and k not in _IPYTHON_NAMES
                       and not (inspect.ismodule(namespace.get(k)) or callable(namespace.get(k))))
        raise ValueError(f"unknown parameter(s) {', '.join(unknown)}: this notebook's parameters "
                         f"are {', '.join(known)} (a misspelled -p name would be ignored)")


def run_config(dataset: str, profile: str, dtype: Optional[str] = None,
               seeds: Optional[int] = None) -> ExperimentConfig:
    """The config a run of the pipeline uses for ``dataset``: the profile's, with ``dtype`` and
    the number of further-training ``seeds`` overridden where given (what its results record,
    so every notebook of the run, the cross-dataset ones too, builds it the same way)."""
    from ..config import get_config
    cfg = get_config(dataset, profile, **({"dtype": dtype} if dtype else {}))
    if seeds is not None:
        if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
            raise ValueError(f"seeds must be an integer >= 1, got {seeds!r}")
        cfg = dataclasses.replace(cfg, further=dataclasses.replace(cfg.further, seeds=seeds))
    return cfg


def load_data(cfg: ExperimentConfig, data_dir=None):
    """The dataset of ``cfg`` (tokenized with ``cfg.encoder`` for text), as the loader gives it."""
    from ...data import load_dataset
    kw = {"encoder": cfg.encoder} if cfg.encoder else {}
    return load_dataset(cfg.dataset, data_dir=data_dir, **kw)


def final_model(cfg: ExperimentConfig, device="cpu", data_dir=None, directory=None):
    """(theta^f, its training data): the saved final model of notebook 01 and the dataset
    restricted to the rows it was trained on (reduced profiles train on a subset; SST-2 holds out
    validation rows), which the gold standard and every method attribute over. A text config with
    ``trainable_layers`` gets the top layers (:class:`fimoda.models.TextTop`) and the dataset
    as features of the frozen trunk below them."""
    from ...training import frozen_trunk, load_final_model, training_dataset
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


def select_loo_indices(cfg: ExperimentConfig, n_train: int) -> np.ndarray:
    """The left-out set L (paper §6.1): every ``loo_stride``-th training index for
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
    return (as_inputs(ds.X_train, dtype, device), as_targets(ds.y_train, cfg.task, dtype, device),
            as_inputs(ds.X_test, dtype, device), as_targets(ds.y_test, cfg.task, dtype, device))


def out_dir(cfg: ExperimentConfig, root=None) -> Path:
    return results_dir(cfg.profile, cfg.dataset, root)
