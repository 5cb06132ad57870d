"""Notebook 08, the field's yardsticks beside the paper's, on the models of notebooks 01-03:
group leave-out further training against the sum of single leave-outs (:func:`group_runs`,
:func:`additivity_table`, :func:`group_cosine_table`), the linear datamodeling score two ways
(:func:`lds_runs`, :func:`retrain_runs`, :func:`lds_table`), the noise ceiling of notebook
02's gold standard (:func:`ceiling_tables`) on the tabular MLPs, and LoRA further training
against the full-parameter gold on the text encoder (:func:`lora_runs`).

Every run is kept in the result store next to the dataset's other results
(``results/<profile>/<dataset>/yardsticks_*.npz``, reused while theta^f, the data, the instances
and the settings are these; resumed from ``work_yardsticks_*`` when interrupted), and the numbers
for ``summary.md`` in ``yardsticks_summary_<optimizer>.csv`` (:func:`save_summary`). The tables
live in :mod:`.yardstick_tables` and are re-exported here.
The settings are :class:`fimoda.settings.YardstickConfig`, reduced per profile in the dataset specs.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

import numpy as np

from ... import store
from ..config import YARDSTICK_DATASETS, yardstick_config, yardstick_reductions
from ...settings import ExperimentConfig, YardstickConfig
from ...gold import GoldResult, gold_scores
from ...io import load_npz, save_npz, sha256_arrays
from ...yardsticks import LDSRuns
from .gold_runs import gold_config, gold_settings
from .lora_study import lora_applies, lora_runs
from .records import config_without, final_model_source
# the tables of the runs below, here too as notebook 08 calls them (yx.lds_table, ...)
from .yardstick_tables import (GOLD, additivity_table, ceiling_tables, group_cosine_table,
                               lds_table, save_summary, size_one_check)
from .setup import final_model, out_dir, select_loo_indices, select_test_indices, tensors

__all__ = ["YARDSTICK_DATASETS", "applies", "settings", "reductions", "draw_groups",
           "group_runs", "lds_runs", "retrain_runs", "size_one_check", "additivity_table",
           "group_cosine_table", "lds_table", "ceiling_tables", "lora_applies", "lora_runs",
           "save_summary"]

NOTEBOOK = "notebooks/08_yardsticks"


def applies(cfg: ExperimentConfig) -> tuple[bool, str]:
    """(whether notebook 08's sections 1-3 run for this dataset, why not): the MLPs, whose
    re-training from scratch the engine runs (:func:`fimoda.gold.retrain_loo`)."""
    if cfg.model != "mlp":
        return False, (f"{cfg.dataset}: sections 1-3 run on the tabular MLPs; re-training the "
                       f"{cfg.model} model from scratch M times is outside this engine and budget")
    return True, ""


def settings(cfg: ExperimentConfig, n_gold_seeds: Optional[int] = None) -> YardstickConfig:
    """The profile's :class:`YardstickConfig` for ``cfg``'s dataset, ``group_seeds`` resolved to
    a number: at most the gold standard's seeds (``n_gold_seeds``, else ``cfg.further.seeds``)."""
    y = yardstick_config(cfg.dataset, cfg.profile)
    gold = int(n_gold_seeds if n_gold_seeds is not None else cfg.further.seeds)
    return dataclasses.replace(y, group_seeds=min(y.group_seeds or gold, gold))


def reductions(cfg: ExperimentConfig, ycfg: YardstickConfig, n_loo: int) -> list[str]:
    """Every change of sections 1-3's settings from the profile's full ones, and the group sizes
    dropped because L is smaller."""
    out = [r for r in yardstick_reductions(ycfg, cfg.profile)
           if not r.startswith(("group_seeds", "lora_"))]
    out = [f"retrain_epochs: the final model's {cfg.train.epochs} -> {ycfg.retrain_epochs}"
           if r.startswith("retrain_epochs") else r for r in out]
    if ycfg.group_seeds < cfg.further.seeds:
        out.append(f"group runs: the first {ycfg.group_seeds} of the gold standard's "
                   f"{cfg.further.seeds} seeds")
    dropped = [k for k in ycfg.group_sizes if k >= n_loo]
    if dropped:
        out.append(f"group sizes {dropped} dropped: |L| = {n_loo} (a size must leave some of L in)")
    return out


def draw_groups(n_loo: int, ycfg: YardstickConfig) -> dict:
    """{|S|: positions in L (g, |S|)}: for every size below ``n_loo``, ``groups_per_size`` random
    groups (size 1: that many distinct instances, at most |L|), each row sorted; drawn by
    ``numpy.random.default_rng(draw_seed)``, the same seed giving the same groups."""
    rng = np.random.default_rng(ycfg.draw_seed)
    out = {}
    for k in ycfg.group_sizes:
        if k >= n_loo:
            continue
        if k == 1:
            out[k] = np.sort(rng.choice(n_loo, min(ycfg.groups_per_size, n_loo),
                                        replace=False))[:, None]
        else:
            out[k] = np.stack([np.sort(rng.choice(n_loo, k, replace=False))
                               for _ in range(ycfg.groups_per_size)])
    return out


def _padded(groups: dict) -> tuple[np.ndarray, np.ndarray]:
    """(positions (m, G) padded with -1, |S| of each row) of :func:`draw_groups`' groups."""
    G = max(groups)
    rows = [np.pad(p, (0, G - len(p)), constant_values=-1) for ps in groups.values() for p in ps]
    return np.stack(rows).astype(np.int64), np.concatenate(
        [np.full(len(ps), k) for k, ps in groups.items()]).astype(np.int64)


def _inputs(cfg, device):
    model, ds = final_model(cfg, device)
    return model, ds, select_loo_indices(cfg, len(ds.X_train)), \
        select_test_indices(cfg, len(ds.X_test))


def _common(cfg, model, ds, loo, test, d) -> dict:
    """What every run of notebook 08 is computed from, beside its own settings."""
    return {"experiment": config_without(cfg, "methods"), **final_model_source(d),
            "theta": sha256_arrays(*[v for _, v in sorted(model.state_dict().items())]),
            "data": sha256_arrays(ds.X_train, ds.y_train, ds.X_test, ds.y_test),
            "loo_indices": np.asarray(loo).tolist(), "test_indices": np.asarray(test).tolist()}


@dataclasses.dataclass(frozen=True)
class _FurtherRuns:
    """What a further-training run of notebook 08 starts from: the gold standard's algorithm
    (``opt``, ``mech``) and its first ``group_seeds`` seeds (``gcfg``), theta^f and its data, the
    left-out and test instances, and the stored file ``path`` in the dataset's results."""
    opt: str
    mech: str
    model: object
    ds: object
    loo: np.ndarray
    test: np.ndarray
    d: Path
    path: Path
    seeds: tuple
    gcfg: object


def _further_runs(cfg, ycfg: YardstickConfig, gold_seeds, optimizer, mechanism, device,
                  stem: str) -> _FurtherRuns:
    opt, mech = gold_settings(cfg, optimizer, mechanism)
    model, ds, loo, test = _inputs(cfg, device)
    d = out_dir(cfg)
    seeds = tuple(int(s) for s in np.asarray(gold_seeds)[: ycfg.group_seeds])
    return _FurtherRuns(opt, mech, model, ds, loo, test, d, d / f"{stem}_{opt}_{mech}.npz", seeds,
                        gold_config(cfg, opt, mech, device, seeds=seeds))


def _save(path, result: GoldResult, **extra) -> dict:
    save_npz(path, loss_full=result.loss_full, loss_loo=result.loss_loo,
             eval_points=result.eval_points, seeds=result.seeds, groups=result.loo_indices,
             **extra)
    return {"seconds": result.seconds}


def group_runs(cfg, ycfg: YardstickConfig, gold_seeds, optimizer=None, mechanism=None,
               device="cpu") -> dict:
    """The group leave-out runs of :func:`draw_groups`: further training from theta^f with the
    gold standard's algorithm (``optimizer``/``mechanism``, None: the dataset's) and its first
    ``ycfg.group_seeds`` seeds ``gold_seeds`` (notebook 02's, so that every group run has the
    leave-one-out runs of the same batch orders); ``yardsticks_groups_<opt>_<mech>.npz``:
    loss_full (S, T, J), loss_loo (S, m, T, J), eval_points, seeds, groups (training indices),
    positions (in L), sizes."""
    import torch
    from ...gold import further_train
    r = _further_runs(cfg, ycfg, gold_seeds, optimizer, mechanism, device, "yardsticks_groups")
    positions, sizes = _padded(draw_groups(len(r.loo), ycfg))
    inputs = {"gold": r.gcfg.numeric(), "seeds": list(r.seeds), "positions": positions.tolist(),
              **_common(cfg, r.model, r.ds, r.loo, r.test, r.d)}

    def compute():
        Xtr, ytr, Xte, yte = tensors(r.ds, cfg, device)
        t = torch.as_tensor(r.test)
        groups = [r.loo[p[p >= 0]] for p in positions]
        result = further_train(r.model, cfg.task, Xtr, ytr, Xte[t], yte[t], groups, r.gcfg,
                               workdir=r.d / f"work_yardsticks_groups_{r.opt}_{r.mech}",
                               test_indices=np.asarray(r.test), workdir_mismatch="replace")
        return _save(r.path, result, positions=positions, sizes=sizes)

    return store.cached(r.path, inputs, compute, load_npz, device=device, rerun=NOTEBOOK,
                        what=f"the group leave-out runs of {cfg.dataset}")


def _lds(z, unit: str) -> LDSRuns:
    """An :class:`LDSRuns` from a stored file of :func:`lds_runs` / :func:`retrain_runs`."""
    result = GoldResult(z["loss_full"], z["loss_loo"], None, None, z["eval_points"], unit,
                        z["seeds"], z["groups"], None, {})
    change = gold_scores(z["loss_full"], z["loss_loo"], adjust="full")
    return LDSRuns(z["subsets"], change, np.asarray(z["eval_points"]), result)


def lds_runs(cfg, ycfg: YardstickConfig, gold_seeds, optimizer=None, mechanism=None,
             device="cpu") -> LDSRuns:
    """The further-training LDS's models (:func:`fimoda.yardsticks.further_training_lds`):
    ``lds_subsets`` random subsets of L keeping ``lds_alpha`` of it, each model further trained
    from theta^f without the rest of L, with the group runs' seeds;
    ``yardsticks_lds_<opt>_<mech>.npz``."""
    import torch
    from ...yardsticks import further_training_lds
    r = _further_runs(cfg, ycfg, gold_seeds, optimizer, mechanism, device, "yardsticks_lds")
    draw = {"n_subsets": ycfg.lds_subsets, "alpha": ycfg.lds_alpha, "seed": ycfg.draw_seed}
    inputs = {"gold": r.gcfg.numeric(), "seeds": list(r.seeds), "subsets": draw,
              **_common(cfg, r.model, r.ds, r.loo, r.test, r.d)}

    def compute():
        Xtr, ytr, Xte, yte = tensors(r.ds, cfg, device)
        t = torch.as_tensor(r.test)
        runs = further_training_lds(r.model, cfg.task, Xtr, ytr, Xte[t], yte[t], r.loo, r.gcfg,
                                    workdir=r.d / f"work_yardsticks_lds_{r.opt}_{r.mech}",
                                    test_indices=np.asarray(r.test), workdir_mismatch="replace",
                                    **draw)
        return _save(r.path, runs.gold, subsets=runs.subsets)

    return _lds(store.cached(r.path, inputs, compute, load_npz, device=device, rerun=NOTEBOOK,
                             what=f"the further-training LDS runs of {cfg.dataset}"), "epoch")


def retrain_runs(cfg, ycfg: YardstickConfig, device="cpu") -> LDSRuns:
    """The re-training LDS's models (:func:`fimoda.yardsticks.retraining_lds` over the pool L):
    ``retrain_subsets`` random subsets of L keeping ``lds_alpha`` of it, each model re-trained
    from theta^0 with the final model's recipe (``retrain_epochs`` where set) on the training
    set without the rest of L; ``yardsticks_retrain.npz``."""
    import torch
    from ...models import build_model
    from ...yardsticks import retraining_lds
    model, ds, loo, test = _inputs(cfg, device)
    d = out_dir(cfg)
    path = d / "yardsticks_retrain.npz"
    epochs = ycfg.retrain_epochs or cfg.train.epochs
    draw = {"n_subsets": ycfg.retrain_subsets, "alpha": ycfg.lds_alpha, "seed": ycfg.draw_seed}
    inputs = {"retrain": {"epochs": epochs, "seeds": ycfg.retrain_seeds, **draw},
              **_common(cfg, model, ds, loo, test, d)}

    def compute():
        Xtr, ytr, Xte, yte = tensors(ds, cfg, device)
        t = torch.as_tensor(test)
        init = build_model(cfg, n_features=Xtr.shape[1], n_classes=ds.n_classes).to(device)
        runs = retraining_lds(init, cfg, Xtr, ytr, Xte[t], yte[t], seeds=ycfg.retrain_seeds,
                              workdir=d / "work_yardsticks_retrain", pool=loo, epochs=epochs,
                              device=device, workdir_mismatch="replace", **draw)
        return _save(path, runs.gold, subsets=runs.subsets)

    return _lds(store.cached(path, inputs, compute, load_npz, device=device, rerun=NOTEBOOK,
                             what=f"the re-training LDS runs of {cfg.dataset}"), "epoch")
