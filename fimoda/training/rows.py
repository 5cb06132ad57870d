"""The training rows of the final model theta^f: validation rows held out for epoch selection and
the random subset of reduced profiles change which rows theta^f sees; :func:`train_rows` gives
them and :func:`training_dataset` the dataset restricted to them, which attribution and further
training must use."""
from __future__ import annotations

import copy
import dataclasses

import numpy as np

from ..settings import ExperimentConfig

__all__ = ["VAL_SIZE", "VAL_FRACTION", "VAL_SEED", "SUBSET_SEED", "train_rows",
           "training_dataset", "dataset_with"]

VAL_SIZE = 1000        # rows held out of the training set for epoch selection ...
VAL_FRACTION = 0.2     # ... at most this fraction of it (tiny datasets)
VAL_SEED = 0
SUBSET_SEED = 0        # seed of the n_train_subset draw (reduced profiles)


def train_rows(cfg: ExperimentConfig, ds) -> tuple[np.ndarray, np.ndarray]:
    """(rows theta^f is trained on, validation rows), both sorted indices into ``ds.X_train``.

    Validation (only when ``cfg.train.select_epoch_by_val``): min(1000, 20 %) training rows
    drawn with seed 0 (``ds.extra["val_indices"]`` of the image datasets are *test* positions
    and are not used here). Training: the rest, or a seed-0 random subset of
    ``cfg.train.n_train_subset`` of them (all of them when there are fewer).
    """
    n = len(ds.X_train)
    rows = np.arange(n, dtype=np.int64)
    val = np.zeros(0, dtype=np.int64)
    if cfg.train.select_epoch_by_val:
        k = min(VAL_SIZE, int(VAL_FRACTION * n))
        if k < 1:
            raise ValueError(f"{n} training rows are too few to hold out a validation set")
        val = np.sort(np.random.RandomState(VAL_SEED).choice(n, k, replace=False))
        rows = np.setdiff1d(rows, val)
    m = cfg.train.n_train_subset
    if m is not None:
        if m < 1:
            raise ValueError(f"n_train_subset={m} must be >= 1")
        if m < len(rows):    # a cap: a dataset smaller than it is used whole
            rows = np.sort(np.random.RandomState(SUBSET_SEED).choice(rows, m, replace=False))
    return rows, val


def training_dataset(cfg: ExperimentConfig, ds):
    """``ds`` with its training part restricted to the rows theta^f was trained on (a shallow
    copy; the test part is unchanged). Attribution and further training must use this."""
    rows, _ = train_rows(cfg, ds)
    if len(rows) == len(ds.X_train):
        return ds
    changes = dict(X_train=ds.X_train[rows], y_train=ds.y_train[rows])
    for name in ("ids_train",):
        if getattr(ds, name, None) is not None:
            changes[name] = np.asarray(getattr(ds, name))[rows]
    raw = getattr(ds, "raw_train", None)
    if raw is not None:
        changes["raw_train"] = raw.iloc[rows]
    extra = dict(getattr(ds, "extra", None) or {})
    for k, v in extra.items():  # per-training-row extras, e.g. sst2's sentences_train
        if k.endswith("_train") and hasattr(v, "__len__") and len(v) == len(ds.X_train):
            extra[k] = [v[i] for i in rows] if isinstance(v, list) else np.asarray(v)[rows]
    changes["extra"] = extra
    return dataset_with(ds, changes)


def dataset_with(ds, changes: dict):
    """A shallow copy of ``ds`` (a dataclass or any object) with ``changes`` applied."""
    if dataclasses.is_dataclass(ds):
        return dataclasses.replace(ds, **changes)
    out = copy.copy(ds)
    for k, v in changes.items():
        setattr(out, k, v)
    return out
