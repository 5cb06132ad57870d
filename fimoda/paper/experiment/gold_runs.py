"""The gold standard as a run of the experiment: further training from theta^f with the dataset's
optimizer and leave-out mechanism (``gold_<optimizer>_<mechanism>.npz``, reused while its record
matches), and LOO re-training from scratch (paper Fig. 11)."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ...settings import ExperimentConfig
from ... import store
from ...io import load_npz, save_npz
from .records import config_without, final_model_source
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


def gold_path(cfg: ExperimentConfig, optimizer: Optional[str] = None,
              mechanism: Optional[str] = None, directory=None) -> Path:
    """``<results>/gold_<optimizer>_<mechanism>.npz`` of the experiment."""
    optimizer, mechanism = gold_settings(cfg, optimizer, mechanism)
    return Path(directory or out_dir(cfg)) / f"gold_{optimizer}_{mechanism}.npz"


def gold_reader_inputs(cfg: ExperimentConfig, optimizer: str, mechanism: str,
                       directory) -> dict:
    """What a reader of the gold standard knows it must have been computed from: the gold
    standard's optimizer and mechanism, the experiment config but the methods' settings, and the
    saved theta^f of ``directory`` (where there is one)."""
    return {"gold": {"optimizer": optimizer, "mechanism": mechanism},
            "experiment": config_without(cfg, "methods"), **final_model_source(directory)}


def load_gold(cfg: ExperimentConfig, optimizer: Optional[str] = None,
              mechanism: Optional[str] = None, directory=None) -> dict:
    """The arrays of ``gold_<optimizer>_<mechanism>.npz`` (a :class:`fimoda.store.Sourced` dict
    naming the file and its sha256) after checking that its record says it
    was computed for ``cfg`` (the whole experiment config but the methods' settings) with this
    optimizer and mechanism, from the theta^f saved beside it: :class:`~.records.StaleResult`
    naming what differs otherwise, FileNotFoundError when there is none,
    :class:`fimoda.io.UnreadableFile` when it is corrupt."""
    optimizer, mechanism = gold_settings(cfg, optimizer, mechanism)
    p = gold_path(cfg, optimizer, mechanism, directory)
    rerun = f"{GOLD_NOTEBOOK} for {cfg.dataset} ({cfg.profile} profile)"
    store.check(p, gold_reader_inputs(cfg, optimizer, mechanism, p.parent), rerun)
    return store.Sourced(load_npz(p), {p.name: store.source(p)["sha256"]})


def gold_config(cfg: ExperimentConfig, optimizer: str, mechanism: str, device="cpu",
                **overrides):
    """The :class:`fimoda.gold.GoldConfig` of the gold standard ``optimizer`` / ``mechanism`` of
    ``cfg``: Adam over the profile's ``adam_epochs`` where it sets them (App. E.1); ``overrides``
    replace any field."""
    from ..config import gold_variant
    from ...gold import GoldConfig
    return GoldConfig.from_experiment(gold_variant(cfg, optimizer, mechanism).further,
                                      device=device, **overrides)


def gold_record(cfg: ExperimentConfig, gcfg, **extra) -> dict:
    """What a gold standard's runs compute, as stored beside them: the further-training settings
    (without where and how fast they run) and the experiment's configuration, plus ``extra``."""
    record = {"gold": dataclasses.asdict(gcfg), "experiment": config_without(cfg, "methods"),
              **extra}
    for k in ("device", "progress", "workers"):     # where and how fast, not what
        record["gold"].pop(k, None)
    return record


def gold_inputs(record: dict, path, model, ds, loo_idx, test_idx) -> dict:
    """Everything a stored gold standard at ``path`` depends on (the result store's inputs):
    ``record``, the theta^f saved beside it, theta's and the data's hashes, the instances."""
    from ...io import sha256_arrays
    return {**record, **final_model_source(Path(path).parent),
            "theta": sha256_arrays(*[v for _, v in sorted(model.state_dict().items())]),
            "data": sha256_arrays(ds.X_train, ds.y_train, ds.X_test, ds.y_test),
            "loo_indices": np.asarray(loo_idx).tolist(),
            "test_indices": np.asarray(test_idx).tolist()}


def run_gold(model, ds, cfg: ExperimentConfig, loo_idx, test_idx, optimizer: Optional[str] = None,
             mechanism: Optional[str] = None, device="cpu", directory=None, reuse: str = "auto",
             **overrides) -> dict:
    """Further training from theta^f for the full set and every left-out set, all seeds
    (``gold_<optimizer>_<mechanism>.npz``), kept in the result store (:func:`fimoda.store.cached`:
    reused while theta^f, the data, the instances, the settings and the environment are these,
    recomputed otherwise; ``reuse="only"`` refuses instead); resumes from ``work_gold_*`` if
    interrupted. Holds the file's lock while it checks, computes and writes it, so a second
    process on the same directory waits and then reuses the result (job-array shards, which
    share the work directory by design, do not take it)."""
    from ...gold.runner import concurrent_executor
    optimizer, mechanism = gold_settings(cfg, optimizer, mechanism)
    path = gold_path(cfg, optimizer, mechanism, directory)
    gcfg = gold_config(cfg, optimizer, mechanism, device, **overrides)
    record = gold_record(cfg, gcfg)
    inputs = gold_inputs(record, path, model, ds, loo_idx, test_idx)
    compute = lambda: _compute_gold(model, ds, cfg, gcfg, record, path, loo_idx, test_idx, device)
    return store.cached(path, inputs, compute, load_npz, device=device,
                        what=f"the {optimizer}/{mechanism} gold standard of {cfg.dataset}",
                        reuse=reuse, lock=not concurrent_executor(),
                        files=[path.with_suffix(".json")],
                        rerun=f"{GOLD_NOTEBOOK} for {cfg.dataset}")


def _compute_gold(model, ds, cfg, gcfg, record, path, loo_idx, test_idx, device) -> dict:
    from ...gold import further_train, save_gold
    from ...gold.runner import concurrent_executor
    optimizer, mechanism = gcfg.optimizer, gcfg.mechanism
    d = path.parent
    Xtr, ytr, Xte, yte = tensors(ds, cfg, device)
    t = torch.as_tensor(test_idx)
    result = further_train(model, cfg.task, Xtr, ytr, Xte[t], yte[t], torch.as_tensor(loo_idx),
                           gcfg, workdir=d / f"work_gold_{optimizer}_{mechanism}",
                           augment=gold_augment(cfg, ds), test_indices=np.asarray(test_idx),
                           workdir_mismatch="error" if concurrent_executor() else "replace")
    save_gold(path, result, {"record": record, "loo_indices": loo_idx, "test_indices": test_idx})
    return {"seconds": result.seconds}


def gold_augment(cfg: ExperimentConfig, ds):
    """The augmentation the gold standard replays (None for data without one): for ResNet-9 the
    final model's random crop + flip, padding with the dataset's ``pad_value``."""
    if cfg.model != "resnet9":
        return None
    import functools
    from ...data import augment_images
    fill = ds.extra.get("pad_value")
    return functools.partial(augment_images, fill=0.0 if fill is None else torch.as_tensor(fill))


def gold_run(model, ds, cfg: ExperimentConfig, test_idx, seed: int, left_out: int,
             until: int, optimizer: Optional[str] = None, mechanism: Optional[str] = None,
             dtype=torch.float64, device="cpu"):
    """The engine's full run and one left-out run (instance ``left_out``) of ``seed``, in
    ``dtype``, until ``until`` (an evaluation point of the gold standard, in its unit:
    epochs, or steps where it evaluates every few steps), with the gold standard's evaluation
    points up to there: a :class:`fimoda.gold.GoldResult` with one seed and one left-out instance, computed, not
    stored. Notebook 02 checks its hand-written run against it in float64, where only the order
    of sums differs between the two."""
    from ...gold import further_train
    import copy
    optimizer, mechanism = gold_settings(cfg, optimizer, mechanism)
    gcfg = gold_config(cfg, optimizer, mechanism, device, seeds=(int(seed),), progress=False)
    if eval_unit(cfg) == "epoch":
        gcfg = dataclasses.replace(gcfg, epochs=int(until))
    else:
        gcfg = dataclasses.replace(gcfg, max_steps=int(until))
    cast = lambda a: a.to(dtype) if a.is_floating_point() else a
    Xtr, ytr, Xte, yte = tensors(ds, cfg, device)
    t = torch.as_tensor(test_idx)
    return further_train(copy.deepcopy(model).to(dtype), cfg.task, cast(Xtr), ytr,
                         cast(Xte[t]), yte[t], torch.as_tensor([int(left_out)]), gcfg,
                         augment=gold_augment(cfg, ds), test_indices=np.asarray(test_idx))


def run_retrain(ds, cfg: ExperimentConfig, loo_idx, test_idx, device="cpu", directory=None,
                seeds: int = 1) -> dict:
    """LOO re-training from scratch (paper Fig. 11): the final model's algorithm from its
    init, with each left-out instance removed; ``retrain_remove.npz``."""
    from ...gold import retrain_loo
    from ...models import build_model
    from ...io import sha256_arrays
    d = Path(directory or out_dir(cfg))
    path = d / "retrain_remove.npz"
    inputs = {"retrain": {"seeds": seeds, "mechanism": "remove"},
              "experiment": config_without(cfg, "methods"),
              "data": sha256_arrays(ds.X_train, ds.y_train, ds.X_test, ds.y_test),
              "loo_indices": np.asarray(loo_idx).tolist(),
              "test_indices": np.asarray(test_idx).tolist()}

    def compute():
        Xtr, ytr, Xte, yte = tensors(ds, cfg, device)
        init = build_model(cfg, n_features=Xtr.shape[1], n_classes=ds.n_classes).to(device)
        t = torch.as_tensor(test_idx)
        result = retrain_loo(init, cfg, Xtr, ytr, Xte[t], yte[t], torch.as_tensor(loo_idx),
                             seeds=seeds, device=device, workdir=d / "work_retrain")
        save_npz(path, loss_full=result.loss_full, loss_loo=result.loss_loo,
                 eval_points=result.eval_points, param_dist=result.param_dist,
                 loo_indices=np.asarray(loo_idx), test_indices=np.asarray(test_idx))

    return store.cached(path, inputs, compute, load_npz, device=device,
                        what=f"LOO re-training of {cfg.dataset}")
