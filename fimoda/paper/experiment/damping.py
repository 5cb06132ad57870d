"""Damping sweeps: a method's scores at every damping of the config's grid (lambda = lambda_G x
grid[k]), one scores file per damping, the configured one being the method's own."""
from __future__ import annotations

from pathlib import Path

from ... import store
from ...settings import ExperimentConfig
from ...io import load_npz
from .methods import METHODS_NOTEBOOK, MethodFailed, run_method, scores_reader_inputs
from .setup import out_dir


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
            store.check(p, scores_reader_inputs(cfg, name, d),
                        f"{METHODS_NOTEBOOK} for {cfg.dataset} ({cfg.profile} profile)")
            out[float(g)] = load_npz(p)["scores"]
    return out
