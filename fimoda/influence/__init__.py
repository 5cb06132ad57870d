"""Gradient-based approximations of further training (paper §4), one module per method family.

Every method is a function ``method(att: Attributor, cfg) -> np.ndarray`` returning
``scores[j, i]`` (test j x left-out i) with the gold standard's sign: positive = the test loss
rises when z_i is left out. ``att`` holds what is computed once (per-example gradients, lambda_G,
Hessian operators); ``cfg`` is the method's small config dataclass. Each method module
declares its :class:`~.specs.MethodSpec` (``SPECS``); :mod:`.specs` holds the registry.

The damped-inverse methods are layered as in pyDVL: :mod:`.operators` (the damped Hessian and
Gauss-Newton operators), :mod:`.solvers` (CG, LiSSA), and a method module that says which
operator and solver a method uses; :mod:`.errors` holds the typed numerical breakdowns.

The methods (:data:`METHODS`, in registry order) and the equation each computes
(docs/equations.md), from their specs: grad_dot and grad_cos (6), cg (12) by conjugate gradients,
lissa (12) and lissa_h (8) by LiSSA, dense (8)/(12) by a dense solve (the reference), arnoldi (8)
in the top-k eigenspace of H, trak (TRAK_{M=1}), ekfac (12) with layer-block EK-FAC, datainf
(kwon2024datainf eq. 5), prop1 (7), cor2 (Cor. 2), eq16 (16), and beyond the paper trajectory
(linearised SGD further training). ``[(s.name, s.equation) for s in method_specs()]`` lists them.
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


def method_config(name: str, cfg=None, **kwargs):
    """The config of method ``name``: ``cfg`` or its defaults, updated by ``kwargs`` (an unknown
    field is a ValueError naming it)."""
    spec = method_spec(name)
    if cfg is None:
        return spec.make_config(**kwargs)
    if kwargs:
        import dataclasses
        spec.check_fields(kwargs)
        cfg = dataclasses.replace(cfg, **kwargs)
    return cfg


def compute_scores(name: str, att: Attributor, cfg=None, **kwargs):
    """Scores of method ``name`` (``cfg`` or its defaults updated by ``kwargs``; an unknown
    field is a ValueError naming it). Before any work its cost
    (:meth:`Attributor.cost`) is printed as one line when the problem shows progress, and a
    budget that cannot hold it is a :class:`~.errors.MemoryBudgetError` naming the setting to
    change. A Hugging Face model runs with eager attention, which has the double backward
    that Hessian products need (:func:`fimoda.hf.eager_attention`; its own is restored)."""
    cfg = method_config(name, cfg, **kwargs)
    try:
        cost = att.cost(name, cfg)
    except (TypeError, ValueError, ArithmeticError):
        cost = None             # a setting the method refuses itself, with its own message
    if cost is not None:
        if att.problem.progress and not cost.refusal:
            from ..progress import note
            note(cost.line())
        cost.check()
    from ..hf import eager_attention
    model = att.problem.model
    with eager_attention(getattr(model, "wrapped", model)):
        return method_spec(name).function(att, cfg)


__all__ = ["Attributor", "METHODS", "PAPER_METHODS", "MethodSpec", "get_method",
           "compute_scores", "method_config", "damping_value", "default_methods", "method_spec",
           "method_specs", "register", "unregister"]
