"""The gold standard as a run of the experiment: further training from theta^f with the dataset's
optimizer and leave-out mechanism (``gold_<optimizer>_<mechanism>.npz``, reused while its record
matches), and LOO re-training from scratch (paper Fig. 11)."""
from __future__ import annotations

import contextlib
import dataclasses
import warnings
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ..config import ExperimentConfig
from ..io import UnreadableFile, load_json, load_npz, save_npz
from ..locks import result_lock
from .records import _canon, _without, check_record
from .setup import out_dir, tensors


def gold_settings(cfg: ExperimentConfig, optimizer: Optional[str] = None,
                  mechanism: Optional[str] = None) -> tuple[str, str]:
    """(optimizer, leave-out mechanism) of the gold standard: the ones given, else the
    dataset's (``cfg.further``): SGD for the tabular sets and images, AdamW for SST-2; ``remove``
    for the tabular sets (what the reference code that produced the paper's tabular figures did:
    z_i taken out of each epoch's sampler order), ``subtract`` for images and text (paper
    App. D.3 and its SST-2 code)."""
    return optimizer or cfg.further.optimizer, mechanism or cfg.further.mechanism


def eval_unit(cfg: ExperimentConfig) -> str:
    """"epoch" where further training is evaluated after every epoch (tabular), else "step"."""
    fc = cfg.further
    return "step" if (fc.max_steps is not None or fc.eval_every is not None) else "epoch"


GOLD_NOTEBOOK = "notebooks/02_gold_further_training"


def load_gold(cfg: ExperimentConfig, optimizer: Optional[str] = None,
              mechanism: Optional[str] = None, directory=None) -> dict:
    """The arrays of ``gold_<optimizer>_<mechanism>.npz`` after checking that its record says it
    was computed for ``cfg`` (the whole experiment config but the methods' settings) with this
    optimizer and mechanism: :class:`~.records.StaleResult` naming what differs otherwise,
    FileNotFoundError when there is none, :class:`fimoda.io.UnreadableFile` when it is corrupt."""
    optimizer, mechanism = gold_settings(cfg, optimizer, mechanism)
    d = Path(directory or out_dir(cfg))
    p = d / f"gold_{optimizer}_{mechanism}.npz"
    rerun = f"{GOLD_NOTEBOOK} for {cfg.dataset} ({cfg.profile} profile)"
    if not p.exists():
        raise FileNotFoundError(f"no gold standard at {p}: run {rerun} first")
    z = load_npz(p)
    meta = load_json(p.with_suffix(".json")) if p.with_suffix(".json").exists() else {}
    check_record(p, meta.get("record"), {
        "gold": {"optimizer": optimizer, "mechanism": mechanism},
        "experiment": _without(cfg, "methods")}, rerun)
    return z


def run_gold(model, ds, cfg: ExperimentConfig, loo_idx, test_idx, optimizer: Optional[str] = None,
             mechanism: Optional[str] = None, device="cpu", directory=None, **overrides) -> dict:
    """Further training from theta^f for the full set and every left-out set, all seeds
    (``gold_<optimizer>_<mechanism>.npz``); resumes from ``work_gold_*`` if interrupted. Holds
    the file's lock (:func:`fimoda.locks.result_lock`) while it checks, computes and writes it,
    so a second process on the same directory waits and then reuses the result (job-array
    shards, which share the work directory by design, do not take it)."""
    from ..gold import GoldConfig
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
    from ..gold.runner import concurrent_executor
    lock = contextlib.nullcontext() if concurrent_executor() else \
        result_lock(path, f"the {optimizer}/{mechanism} gold standard of {cfg.dataset}")
    with lock:
        z = _reusable(path, record, loo_idx, test_idx)
        if z is not None:
            return z
        return _compute_gold(model, ds, cfg, gcfg, record, path, loo_idx, test_idx, device)


def _reusable(path: Path, record: dict, loo_idx, test_idx) -> Optional[dict]:
    """The stored gold standard at ``path`` when its record and instances are these, else None
    (also, with a warning naming it, when it cannot be read: it is then recomputed)."""
    if not (path.exists() and path.with_suffix(".json").exists()):
        return None
    try:
        old = load_json(path.with_suffix(".json"))
        z = load_npz(path)
    except UnreadableFile as e:
        warnings.warn(f"{e}; recomputing it")
        return None
    if (_canon(old.get("record")) == _canon(record)
            and np.array_equal(z["loo_indices"], loo_idx)
            and np.array_equal(z["test_indices"], test_idx)):
        return z
    return None


def _compute_gold(model, ds, cfg, gcfg, record, path, loo_idx, test_idx, device) -> dict:
    from ..gold import further_train, save_gold
    optimizer, mechanism = gcfg.optimizer, gcfg.mechanism
    d = path.parent
    Xtr, ytr, Xte, yte = tensors(ds, cfg, device)
    augment = None
    if cfg.model == "resnet9":      # the same augmentation as the final model's training
        import functools
        from ..data import augment_images
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
    from ..gold import retrain_loo
    from ..models import build_model
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
