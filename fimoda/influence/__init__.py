"""Gradient-based approximations of further training (paper §4), one module per method family.

Every method is a function ``method(att: Attributor, cfg) -> np.ndarray`` returning
``scores[j, i]`` (test j x left-out i) with the gold standard's sign: positive = the test loss
rises when z_i is left out. ``att`` holds what is computed once (per-example gradients, lambda_G,
Hessian operators); ``cfg`` is the method's small config dataclass. Each method module
declares its :class:`~.specs.MethodSpec` (``SPECS``); :mod:`.specs` holds the registry.

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

from .common import Attributor, damping_value
from .specs import (MethodSpec, Registry, default_methods, figure2_methods, method_spec,
                    method_specs, register, unregister)

# name -> implementing module, a live view of the registry (fimoda.influence.specs)
METHODS = Registry()


def __getattr__(name: str):
    if name == "PAPER_METHODS":       # the paper's Figure 2 set, in its legend order
        return figure2_methods()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def get_method(name: str):
    """(function, config class) of method ``name`` (its :class:`MethodSpec`'s)."""
    spec = method_spec(name)
    return spec.function, spec.config


def compute_scores(name: str, att: Attributor, cfg=None, **kwargs):
    """Scores of method ``name`` (``cfg`` or its defaults updated by ``kwargs``; an unknown
    field is a ValueError naming it)."""
    spec = method_spec(name)
    if cfg is None:
        cfg = spec.make_config(**kwargs)
    elif kwargs:
        import dataclasses
        spec.check_fields(kwargs)
        cfg = dataclasses.replace(cfg, **kwargs)
    return spec.function(att, cfg)


__all__ = ["Attributor", "METHODS", "PAPER_METHODS", "MethodSpec", "get_method",
           "compute_scores", "damping_value", "default_methods", "method_spec", "method_specs",
           "register", "unregister"]
