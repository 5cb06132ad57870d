"""Gold-standard results on disk: an npz of the arrays with a JSON sidecar of the configuration."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from ..io import load_json, load_npz, save_json, save_npz
from .config import GoldConfig, GoldResult


def save_gold(path, result: GoldResult, config=None) -> Path:
    """Write ``result`` as ``gold_<optimizer>_<mechanism>.npz`` in directory ``path`` (or to
    ``path`` itself when it ends in .npz) with a JSON sidecar (same name, .json) holding
    ``config`` (a GoldConfig or dict; a dict's keys are kept at the top level) and the run's
    gold configuration. Arrays: loss_full, loss_loo, loo_indices, test_indices, eval_points,
    param_dist, param_dist_loo, seeds. The npz is written first, both atomically."""
    path = Path(path)
    if path.suffix != ".npz":
        path = path / f"gold_{result.config['optimizer']}_{result.config['mechanism']}.npz"
    meta = dataclasses.asdict(config) if isinstance(config, GoldConfig) else dict(config or {})
    test_idx = np.asarray(meta.get("test_indices", result.test_indices))
    loo_idx = np.asarray(meta.get("loo_indices", result.loo_indices))
    if len(test_idx) != result.loss_full.shape[-1] or len(loo_idx) != result.loss_loo.shape[1]:
        raise ValueError("config's test_indices / loo_indices do not match the result's shapes")
    save_npz(path, loss_full=result.loss_full, loss_loo=result.loss_loo, loo_indices=loo_idx,
             test_indices=test_idx, eval_points=result.eval_points, param_dist=result.param_dist,
             param_dist_loo=result.param_dist_loo, seeds=result.seeds)
    meta.setdefault("gold_config", result.config)
    meta.setdefault("eval_unit", result.eval_unit)
    meta.setdefault("seeds", result.seeds)
    meta.setdefault("seconds", result.seconds)
    meta.setdefault("shapes", {"loss_full": result.loss_full.shape,
                               "loss_loo": result.loss_loo.shape})
    save_json(path.with_suffix(".json"), meta)
    return path


def load_gold_result(path) -> GoldResult:
    """Read a file written by :func:`save_gold` back into a :class:`GoldResult`."""
    path = Path(path)
    z = load_npz(path)
    meta = load_json(path.with_suffix(".json")) if path.with_suffix(".json").exists() else {}
    return GoldResult(z["loss_full"], z["loss_loo"], z["param_dist"], z["param_dist_loo"],
                      z["eval_points"], meta.get("eval_unit", "epoch"), z["seeds"],
                      z["loo_indices"], z["test_indices"], meta.get("gold_config", {}),
                      float(meta.get("seconds", 0.0)))
