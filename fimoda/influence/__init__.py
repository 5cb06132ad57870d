"""Gradient-based approximations of further training (paper §4), one module per method family.

Every method is a function ``method(att: Attributor, cfg) -> np.ndarray`` returning
``scores[j, i]`` (test j x left-out i) with the gold standard's sign: positive = the test loss
rises when z_i is left out. ``att`` holds what is computed once (per-example gradients, lambda_G,
Hessian operators); ``cfg`` is the method's small config dataclass.

The damped-inverse methods are layered as in pyDVL: :mod:`.operators` (the damped Hessian and
Gauss-Newton operators), :mod:`.solvers` (CG, LiSSA), and a method module that says which
operator and solver a method uses; :mod:`.errors` holds the typed numerical breakdowns.

| name       | module       | equation (docs/equations.md)                               |
|------------|--------------|------------------------------------------------------------|
| grad_dot   | first_order  | (6)                                                        |
| grad_cos   | first_order  | (6), both gradients normalised                             |
| cg         | cg           | (12) by conjugate gradients on G + lambda I                 |
| lissa      | lissa        | (12) by LiSSA on G + lambda I                               |
| lissa_h    | lissa        | (8) by LiSSA on the true H + lambda I                       |
| dense      | dense        | (8)/(12) by a dense solve (small models; the reference)     |
| arnoldi    | arnoldi      | (8) in the top-k eigenspace of H                            |
| trak       | trak         | TRAK_{M=1}                                                  |
| ekfac      | ekfac        | (12) with layer-block EK-FAC                                |
| datainf    | datainf      | kwon2024datainf eq. (5)                                     |
| prop1      | generalized  | (7) with Delta-theta(D) of (15)                             |
| cor2       | generalized  | Cor. 2 (Gauss-Newton form of (7))                           |
| eq16       | generalized  | (16) near-stationary                                        |
| trajectory | trajectory   | linearised SGD further training, (eta/n) sum_k (I-eta A)^k  |
"""
from __future__ import annotations

import importlib

from .common import Attributor, damping_value

METHODS = {
    "grad_dot": "first_order", "grad_cos": "first_order",
    "cg": "cg", "lissa": "lissa", "lissa_h": "lissa", "dense": "dense",
    "arnoldi": "arnoldi", "trak": "trak", "ekfac": "ekfac", "datainf": "datainf",
    "prop1": "generalized", "cor2": "generalized", "eq16": "generalized",
    "trajectory": "trajectory",
}
# The paper's Figure 2 set, in its legend order.
PAPER_METHODS = ("grad_dot", "grad_cos", "datainf", "cg", "lissa", "lissa_h", "trak", "ekfac")


def get_method(name: str):
    """(function, config class) of a method by name; the config class is ``<Name>Config``."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose from {sorted(METHODS)}")
    mod = importlib.import_module(f"{__name__}.{METHODS[name]}")
    fn = getattr(mod, name)
    cfg_cls = getattr(mod, "".join(p.capitalize() for p in name.split("_")) + "Config")
    return fn, cfg_cls


def compute_scores(name: str, att: Attributor, cfg=None, **kwargs):
    """Scores of method ``name`` (``cfg`` or its defaults updated by ``kwargs``)."""
    fn, cfg_cls = get_method(name)
    if cfg is None:
        cfg = cfg_cls(**kwargs)
    elif kwargs:
        import dataclasses
        cfg = dataclasses.replace(cfg, **kwargs)
    return fn(att, cfg)


__all__ = ["Attributor", "METHODS", "PAPER_METHODS", "get_method", "compute_scores",
           "damping_value"]
