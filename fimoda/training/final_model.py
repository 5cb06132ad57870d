"""Training of the final model theta^f (paper App. D.2), saved once and reused.

theta^f = A(D, theta_0, xi): minibatch training from the initialisation theta_0 (seed
``cfg.train.seed``) on the mean per-example loss of each batch,

    theta <- theta - lr_t * step( (1/|B|) sum_{i in B} L(z_i; theta) ),

with the batch order xi drawn by ``torch.randperm`` from a ``torch.Generator`` seeded with
``cfg.train.seed``, a fresh permutation every epoch (the last batch of an epoch may be smaller).

- MLP (tabular): plain SGD (no momentum, constant lr), batch 128, in ``cfg.dtype`` (float64).
- ResNet-9 (images): SGD, lr 0.4, weight decay 1e-3, batch 512 (paper). The paper states nothing
  more; as a documented choice we follow the DAWNBench ResNet-9 recipe it comes from: Nesterov
  momentum 0.9 and a triangular schedule (linear warm-up over the first 20 % of the steps to the
  peak lr, then linear decay towards 0), BatchNorm in train mode, random crop + flip augmentation
  (``fimoda.data.augment_images``) on every batch, no label smoothing.
- Text (BERT-family encoder + linear head): AdamW, lr 1e-5, weight decay 0, batch 64, gradient
  norm clipped at 1, the encoder's own dropout active while training. With
  ``cfg.train.select_epoch_by_val`` the weights of the epoch with the best validation accuracy
  are kept. The paper selected on the SST-2 dev set, but that set is our evaluation ("test") set,
  so validation is a held-out part of the training set instead (1000 sentences, seed 0).

Rows: validation rows (when selecting by validation) and ``cfg.train.n_train_subset`` (reduced
profiles) change which training rows theta^f sees; :func:`train_rows` gives them and
:func:`training_dataset` the dataset restricted to them, which is what attribution and further
training must use.

After training the model is in ``eval()`` mode (BatchNorm uses running statistics, no dropout).
``<out_dir>/final_model.pt`` (state_dict) and ``final_model.json`` (record) are written atomically,
then the result store's record (``final_model.pt.record.json``, :mod:`fimoda.store`); a later call
with the same config, procedure and data loads them instead of retraining, a different one
retrains (never a silent reuse of a mismatched model).

Every final model must beat its trivial predictor (majority class and class prior; training mean)
on the test rows by :data:`~fimoda.training.baselines.FINAL_MODEL_MARGIN`
(:mod:`fimoda.training.baselines`): a model
that does not is neither saved nor loaded, and the record holds the comparison (``baseline``).
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io as _io
import json
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from .. import store
from ..io import atomic_write, load_json, save_json, sha256_arrays
from ..models import build_model, n_params, resolve_dtype
from ..settings import ExperimentConfig
from ..tensors import as_inputs, as_targets, check_finite
from .baselines import (FINAL_MODEL_MARGIN, BaselineMargin, baseline_check, require_beaten,
                        trivial_baseline)
from .loop import PROCEDURE, evaluate, fit_model, procedure
from .rows import SUBSET_SEED, train_rows, training_dataset
from .text_trunk import frozen_trunk, trunk_features

__all__ = ["MODEL_FILE", "RECORD_FILE", "FINAL_MODEL_NOTEBOOK", "train_final_model",
           "load_final_model", "load_record", "model_key"]

MODEL_FILE = "final_model.pt"
RECORD_FILE = "final_model.json"

# ----------------------------------------------------------------------------- save / load
def model_key(cfg: ExperimentConfig, ds) -> dict:
    """What must match for a saved model to be reused: the parts of the config that define
    theta^f (dataset, task, model, dtype, encoder, training; not the settings of further training
    or of the methods, which are downstream of it), the procedure, the data."""
    full = cfg.to_dict()
    defining = {k: full[k] for k in ("dataset", "task", "model", "dtype", "encoder", "width",
                                     "trainable_layers", "train", "stand_in_for")}
    return json.loads(json.dumps({
        "config": defining, "procedure": procedure(cfg),
        "data_files": dict(getattr(ds, "files", None) or {}),
        "data_arrays_sha256": sha256_arrays(ds.X_train, ds.y_train, ds.X_test, ds.y_test),
    }, default=str))


def _check(cfg: ExperimentConfig, ds):
    if cfg.task != ds.task:
        raise ValueError(f"config task {cfg.task!r} does not match dataset task {ds.task!r}")
    for part in ("train", "test"):
        X, y = getattr(ds, f"X_{part}"), getattr(ds, f"y_{part}")
        if len(X) == 0 or len(X) != len(y):
            raise ValueError(f"X_{part} ({len(X)} rows) and y_{part} ({len(y)}) must be "
                             f"non-empty and equally long")
        if np.asarray(y).ndim != 1:
            raise ValueError(f"y_{part} must be 1-d, got shape {np.asarray(y).shape}")
        check_finite(f"X_{part}", X)
        check_finite(f"y_{part}", y)
    if cfg.task == "classification":
        y = np.asarray(ds.y_train)
        if y.min() < 0 or y.max() >= ds.n_classes:
            raise ValueError(f"labels must lie in [0, {ds.n_classes}), got [{y.min()}, {y.max()}]")
    if cfg.train.epochs < 1 or cfg.train.batch_size < 1:
        raise ValueError("cfg.train.epochs and cfg.train.batch_size must be >= 1")


def _build(cfg: ExperimentConfig, ds, device):
    shape = np.shape(ds.X_train)
    model = build_model(cfg, n_features=shape[1] if cfg.model == "mlp" else None,
                        in_channels=shape[1] if cfg.model == "resnet9" else 3,
                        n_classes=ds.n_classes)
    return model.to(device)


def load_final_model(cfg: ExperimentConfig, ds, out_dir, device="cpu",
                     margin: Optional[BaselineMargin] = FINAL_MODEL_MARGIN) -> torch.nn.Module:
    """theta^f saved in ``out_dir``, in eval mode; ValueError if it was trained with another
    config, procedure or data, :class:`~fimoda.training.baselines.TrivialModelError` if it does
    not beat its trivial predictor by ``margin`` (checked again on every load, so a model saved by
    an older version without the check is refused too), FileNotFoundError if there is none. Its
    record: :func:`load_record`."""
    return _load(cfg, ds, out_dir, device, margin)[0]


def load_record(out_dir) -> dict:
    """The JSON record saved next to the final model in ``out_dir``."""
    path = Path(out_dir) / RECORD_FILE
    if not path.exists():
        raise FileNotFoundError(f"no final-model record in {out_dir}: run train_final_model first")
    return load_json(path)


def _baseline(cfg: ExperimentConfig, ds, test_metrics: dict, margin) -> dict:
    """The record's ``baseline`` entry: the trivial predictor of the rows theta^f trained on,
    scored on the test rows its metrics were computed on (the same seed-0 sample of
    ``test_metrics["n"]`` rows), and :func:`~fimoda.training.baselines.baseline_check` against
    ``margin`` (None: the default margin, reported but not enforced)."""
    rows = train_rows(cfg, ds)[0]
    test = _eval_rows(len(ds.y_test), int(test_metrics["n"]))
    trivial = trivial_baseline(cfg.task, np.asarray(ds.y_train)[rows],
                               np.asarray(ds.y_test)[test], ds.n_classes)
    used = FINAL_MODEL_MARGIN if margin is None else margin
    return dict(baseline_check(cfg.task, test_metrics, trivial, used), trivial=trivial,
                margin=dataclasses.asdict(used), enforced=margin is not None)


FINAL_MODEL_NOTEBOOK = "notebooks/01_final_models"


def _load(cfg: ExperimentConfig, ds, out_dir, device="cpu", margin=FINAL_MODEL_MARGIN):
    """(model, record) from ``out_dir`` after checking both against the experiment: the result
    store's record (:func:`fimoda.store.check`: config, procedure and data as :func:`model_key`,
    and the sha256 of the model file and its JSON record), then the trivial-predictor check."""
    out_dir = Path(out_dir)
    mpath, rpath = out_dir / MODEL_FILE, out_dir / RECORD_FILE
    if not (mpath.exists() and rpath.exists()):
        raise FileNotFoundError(f"no final model in {out_dir}: run train_final_model first")
    store.check(mpath, model_key(cfg, ds), f"{FINAL_MODEL_NOTEBOOK} (train_final_model)")
    record = load_json(rpath)
    # recomputed from the record's test metrics: records saved before the check have none
    record["baseline"] = _baseline(cfg, ds, record["metrics"]["test"], margin)
    if margin is not None:
        require_beaten(record["baseline"], f"the final model saved in {out_dir} is refused")
    model = _build(cfg, ds, device)
    model.load_state_dict(torch.load(mpath, map_location=device, weights_only=True))
    model.eval()
    return model, record


@contextlib.contextmanager
def _num_threads(n: Optional[int]):
    """Run the block with ``n`` intra-op threads (None: leave the setting alone)."""
    old = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _eval_rows(n: int, max_rows: Optional[int]) -> np.ndarray:
    """All of ``n`` rows, or a seed-0 random sorted sample of ``max_rows`` of them."""
    if max_rows is None or max_rows >= n:
        return np.arange(n)
    if max_rows < 1:
        raise ValueError(f"max_eval_rows must be >= 1, got {max_rows}")
    return np.sort(np.random.RandomState(0).choice(n, max_rows, replace=False))


def train_final_model(cfg: ExperimentConfig, ds, device="cpu", out_dir=None, progress=True,
                      force=False, max_eval_rows: Optional[int] = None,
                      margin: Optional[BaselineMargin] = FINAL_MODEL_MARGIN):
    """Train theta^f for ``ds`` as ``cfg`` says (module docstring), or load it from ``out_dir``
    when a saved one matches. Returns (model in eval mode, record).

    ``max_eval_rows``: the final train/test metrics of the record use at most this many rows of
    each (a seed-0 random sample; ``n`` in the record says how many); None takes
    ``cfg.train.eval_rows``, whose None evaluates everything. It does not change the model.

    With ``out_dir`` the model is a stored result (:func:`fimoda.store.cached`): its file lock is
    held throughout (a second process training the same model waits, then loads the first
    one's), and a saved model is reused only while its record names this config, procedure and
    data and its files are intact (``force``: retrain regardless).

    The trained model must beat its trivial predictor (:mod:`fimoda.training.baselines`) by
    ``margin``; otherwise :class:`~fimoda.training.baselines.TrivialModelError` gives the numbers
    and nothing is saved (no model file, no record). A saved model is checked again when loaded,
    and one that fails is refused the same way (retraining with the same settings would give the
    same model).
    ``margin=None`` reports the check in the record without enforcing it: only for tests of the
    training machinery on toy data, never for a model that is attributed."""
    _check(cfg, ds)                  # bad input: one error before anything is written
    if out_dir is None:
        return _train(cfg, ds, device, None, progress, max_eval_rows, margin)
    out_dir = Path(out_dir)

    def load(path):
        model, record = _load(cfg, ds, out_dir, device, margin)
        if progress and not trained:
            print(f"final model: loaded from {path}")
        return model, record

    trained = []
    compute = lambda: trained.append(_train(cfg, ds, device, out_dir, progress, max_eval_rows,
                                            margin))
    # the training's own thread count (the procedure's, where it fixes one) sets its bits
    return store.cached(out_dir / MODEL_FILE, model_key(cfg, ds), compute, load, device=device,
                        what=f"the final model of {cfg.dataset}", files=[out_dir / RECORD_FILE],
                        reuse="never" if force else "auto",
                        threads=PROCEDURE[cfg.model].get("threads"))


def _train(cfg: ExperimentConfig, ds, device, out_dir, progress, max_eval_rows, margin):
    """Train theta^f (module docstring), check it against its trivial predictor, and with
    ``out_dir`` write the model file and its JSON record; returns (model, record)."""
    rows, val = train_rows(cfg, ds)
    if len(rows) < len(ds.X_train):
        print(f"final model: training on {len(rows)} of {len(ds.X_train)} training rows"
              f" ({len(val)} held out for validation, n_train_subset={cfg.train.n_train_subset},"
              f" seed {SUBSET_SEED})")
    dtype = resolve_dtype(cfg.dtype)
    Xtr = as_inputs(np.asarray(ds.X_train)[rows], dtype, device)
    ytr = as_targets(np.asarray(ds.y_train)[rows], cfg.task, dtype, device)
    Xte = as_inputs(ds.X_test, dtype, device)
    yte = as_targets(ds.y_test, cfg.task, dtype, device)
    Xval = yval = None
    if len(val):
        Xval = as_inputs(np.asarray(ds.X_train)[val], dtype, device)
        yval = as_targets(np.asarray(ds.y_train)[val], cfg.task, dtype, device)

    model = _build(cfg, ds, device)
    fitted = model
    if cfg.trainable_layers is not None:     # frozen trunk: fit the top on its features
        # the features every later step loads (frozen_trunk's cache in out_dir): computed once
        fitted, fds = frozen_trunk(cfg, model, training_dataset(cfg, ds), out_dir, progress)
        Xtr, Xte = (as_inputs(a, dtype, device) for a in (fds.X_train, fds.X_test))
        if Xval is not None:
            Xval = trunk_features(model, cfg.trainable_layers, Xval, progress=progress)
        print(f"final model: encoder layers below {fitted.first} and the embeddings frozen "
              f"(pretrained); training the top {cfg.trainable_layers} layer(s) and the head")
    with _num_threads(PROCEDURE[cfg.model].get("threads")):
        threads = torch.get_num_threads()
        t0 = time.perf_counter()
        curves, best_epoch = fit_model(fitted, cfg, Xtr, ytr, Xte, yte, Xval, yval, progress,
                                  pad_value=(getattr(ds, "extra", None) or {}).get("pad_value"))
        model.eval()                      # the whole model, frozen trunk included
        wall = time.perf_counter() - t0
        eval_bs = None if cfg.model == "mlp" else cfg.train.batch_size
        cap = cfg.train.eval_rows if max_eval_rows is None else max_eval_rows
        r, t = (torch.as_tensor(_eval_rows(len(a), cap)).to(device) for a in (Xtr, Xte))
        metrics = {"train": evaluate(fitted, Xtr[r], ytr[r], cfg.task, eval_bs),
                   "test": evaluate(fitted, Xte[t], yte[t], cfg.task, eval_bs)}
        if Xval is not None:
            metrics["val"] = evaluate(fitted, Xval, yval, cfg.task, eval_bs)
    baseline = _baseline(cfg, ds, metrics["test"], margin)
    if margin is not None:          # before anything is written
        require_beaten(baseline, f"the final model of {cfg.dataset} ({cfg.profile} profile) "
                                 f"is refused and not saved")

    buf = _io.BytesIO()
    torch.save(model.state_dict(), buf)
    blob = buf.getvalue()
    record = dict(model_key(cfg, ds))
    record.update(
        dataset=cfg.dataset, profile=cfg.profile, model=cfg.model, dtype=cfg.dtype,
        stand_in_for=getattr(ds, "stand_in_for", None) or cfg.stand_in_for,
        n_params=n_params(model), n_params_trained=n_params(fitted),
        n_train_total=len(ds.X_train), n_train_used=len(rows),
        train_rows=None if len(rows) == len(ds.X_train) else rows.tolist(),
        val_rows=val.tolist() if len(val) else None,
        best_epoch=best_epoch + 1, epochs=cfg.train.epochs, metrics=metrics, baseline=baseline,
        curves=curves,
        wall_time_s=wall, torch_version=torch.__version__, num_threads=threads,
        device=str(device), model_sha256=hashlib.sha256(blob).hexdigest(),
    )
    if out_dir is not None:
        out_dir = Path(out_dir)
        atomic_write(out_dir / MODEL_FILE, lambda fh: fh.write(blob))
        save_json(out_dir / RECORD_FILE, record)  # written last: the commit marker
    return model, record
