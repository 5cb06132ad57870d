"""One spec per method: everything the package knows about a method besides its numerics.

A method is one module plus one :class:`MethodSpec` in it (``SPECS``, a tuple of the module's
specs): the scoring function, its config dataclass (which holds the method's own defaults), where
its look lives in the one style map (:mod:`fimoda.style`, which also holds its legend label),
which of the paper's figures and which default runs include it, what the experiment's profiles
may pass to it, and when the paper's large-model runs skip it and why. Every per-method table of
the package is derived from the registry below: :data:`fimoda.influence.METHODS`,
:data:`fimoda.influence.PAPER_METHODS` (Figure 2), :data:`fimoda.style.METHOD_KEYS`, notebook
07's :data:`fimoda.paper.beyond.PAPER_SIDE`, the methods run when none are named, the large models'
skips of :mod:`fimoda.paper.config`.

Adding a method: write its module (function ``name(att, cfg) -> scores[j, i]``, config
dataclass, ``SPECS``), give it a look in :mod:`fimoda.style`, and list the module in
:data:`BUILTIN_MODULES` -- or, from outside the package, :func:`register` its spec at run time.
"""
from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass
from typing import Callable, Iterator, Mapping, Optional

__all__ = ["MethodSpec", "Registry", "BUILTIN_MODULES", "DAMPING", "DAMPED", "register",
           "unregister", "method_spec", "method_specs", "default_methods", "figure2_methods",
           "paper_methods", "assumption1_methods", "large_model_skips", "check_settings"]

# The modules whose SPECS make up the registry, in registry order: the order methods run in when
# none are named, and the order of every listing of them.
BUILTIN_MODULES = ("first_order", "cg", "lissa", "dense", "arnoldi", "trak", "ekfac", "datainf",
                   "generalized", "trajectory")

# The experiment-wide settings (fields of fimoda.settings.MethodConfig) a method may take, by the
# names of its own config fields: the damping lambda = lambda_G x damping_grid[damping_index]...
DAMPING = ("damping_grid", "damping_index")
# ... and with it the memory budget (GB) of the damped-inverse methods' materialised matrices
DAMPED = DAMPING + ("memory_gb",)


@dataclass(frozen=True)
class MethodSpec:
    """What the package knows about one method (kronfluence-style: every field says its
    meaning).

    ``name``: the registry key, the ``method=`` of :func:`fimoda.attribute`, the part of the
    scores file's name ``scores_<name>.npz``. ``function``: ``function(att, cfg)`` returns
    ``scores[j, i]`` (test j x left-out i, float) with the gold standard's sign (positive: the
    test loss rises when z_i is left out). ``config``: its frozen config dataclass; its field
    defaults are the method's own (the paper's where the paper fixed them). ``equation``: what
    it computes, by the paper's equation numbers (docs/equations.md). ``style``: the key of its
    look (colour, line, marker, legend label) in :mod:`fimoda.style` (None: ``name``).
    ``paper``: one of the paper's methods (False: beyond the paper). ``run_by_default``: run
    when no list of methods is given (notebook 03, ``fimoda attribute``; the dense reference is
    not). ``figure2``: its place (1 = first) in the legend of the paper's Figure 2; None: not
    in Figure 2. ``shared``: the experiment-wide settings a profile passes to it (names both
    of :class:`fimoda.settings.MethodConfig` fields and of its config's fields, e.g.
    :data:`DAMPED`). ``from_experiment``: None, or a function of the whole experiment config
    returning further config fields (the trajectory's: the dataset's further training).
    ``large_model_skip``: why the paper's runs on ResNet-9 and the text encoder skip it (None:
    they run it). ``assumption1``: its linear solve needs the damped true Hessian positive
    definite (the paper's Assumption 1), so the experiment raises its damping where needed.
    ``cost``: None, or ``cost(shape, cfg)`` returning its :class:`fimoda.influence.cost.Cost`
    (peak memory, per-example gradients, Hessian products, or a refusal) for a problem of
    :class:`~fimoda.influence.cost.Shape` ``shape`` and its config ``cfg``, without any work."""
    name: str
    function: Callable
    config: type
    equation: str
    style: Optional[str] = None
    paper: bool = True
    run_by_default: bool = True
    figure2: Optional[int] = None
    shared: tuple = ()
    from_experiment: Optional[Callable] = None
    large_model_skip: Optional[str] = None
    assumption1: bool = False
    cost: Optional[Callable] = None

    def estimate(self, shape, cfg):
        """Its :class:`~fimoda.influence.cost.Cost` for ``shape`` and config ``cfg`` (None
        when it has no ``cost`` hook)."""
        return None if self.cost is None else self.cost(shape, cfg)

    @property
    def look(self) -> str:
        """The key of its look in :mod:`fimoda.style`."""
        return self.style or self.name

    @property
    def label(self) -> str:
        """Its legend label, from the one style map."""
        from ..style import label
        return label(self.look)

    @property
    def module(self) -> str:
        """The module that implements it (relative to :mod:`fimoda.influence` where inside)."""
        mod = self.function.__module__
        return mod.rpartition(".")[2] if mod.startswith(__package__ + ".") else mod

    def fields(self) -> tuple:
        """The names of its config's fields."""
        return tuple(f.name for f in dataclasses.fields(self.config))

    def check_fields(self, names) -> None:
        """That every name of ``names`` is a field of its config: a ValueError naming the
        unknown ones and listing its fields otherwise."""
        unknown = sorted(set(names) - set(self.fields()))
        if unknown:
            raise ValueError(f"method {self.name!r} has no setting {', '.join(map(repr, unknown))}"
                             f"; its settings: {', '.join(self.fields())}")

    def make_config(self, **fields):
        """Its config with ``fields`` set; an unknown field is a ValueError naming it."""
        self.check_fields(fields)
        return self.config(**fields)


_REGISTRY: dict = {}
_LOADED = False


def _load() -> dict:
    """The registry, the built-in modules' specs loaded on first use."""
    global _LOADED
    if not _LOADED:
        _LOADED = True
        for mod in BUILTIN_MODULES:
            for spec in importlib.import_module(f"{__package__}.{mod}").SPECS:
                _add(spec)
    return _REGISTRY


def _add(spec: MethodSpec) -> None:
    if not isinstance(spec, MethodSpec):
        raise TypeError(f"a method is registered by its MethodSpec, got {type(spec).__name__}")
    if not spec.name.isidentifier():
        raise ValueError(f"method name {spec.name!r} must be an identifier")
    if spec.name in _REGISTRY:
        raise ValueError(f"method {spec.name!r} is already registered")
    if not (dataclasses.is_dataclass(spec.config) and isinstance(spec.config, type)):
        raise TypeError(f"method {spec.name!r}: config must be a dataclass, got {spec.config!r}")
    missing = sorted(set(spec.shared) - set(spec.fields()))
    if missing:
        raise ValueError(f"method {spec.name!r} takes the shared settings {missing}, which its "
                         f"config {spec.config.__name__} lacks")
    from ..style import STYLE_KEYS, has_look
    if not has_look(spec.look):
        raise ValueError(f"method {spec.name!r} has no look {spec.look!r} in fimoda.style: add "
                         f"one (fimoda.style.add_look); known: {', '.join(STYLE_KEYS)}")
    _REGISTRY[spec.name] = spec


def register(spec: MethodSpec) -> MethodSpec:
    """Add a method to the registry (after the built-in ones): it is then known to
    :func:`fimoda.attribute`, the command line and the experiment's runs. Its look must be in
    :mod:`fimoda.style` already (:func:`fimoda.style.add_look`). Returns ``spec``."""
    _load()
    _add(spec)
    return spec


def unregister(name: str) -> MethodSpec:
    """Remove method ``name`` from the registry; returns its spec."""
    return _load().pop(method_spec(name).name)


def method_spec(name: str) -> MethodSpec:
    """The spec of method ``name``; an unknown name is a ValueError listing the known ones."""
    reg = _load()
    if name not in reg:
        raise ValueError(f"unknown method {name!r}; choose from {', '.join(reg)}")
    return reg[name]


def method_specs() -> tuple:
    """Every registered spec, in registry order."""
    return tuple(_load().values())


def default_methods() -> tuple:
    """The methods run when none are named, in registry order."""
    return tuple(s.name for s in method_specs() if s.run_by_default)


def figure2_methods() -> tuple:
    """The methods of the paper's Figure 2, in its legend order."""
    return tuple(s.name for s in sorted((s for s in method_specs() if s.figure2 is not None),
                                        key=lambda s: s.figure2))


def paper_methods() -> tuple:
    """The paper's methods run by default: Figure 2's in its legend order, then the others
    (Arnoldi, the generalized influence functions) in registry order."""
    fig2 = figure2_methods()
    return fig2 + tuple(s.name for s in method_specs()
                        if s.paper and s.run_by_default and s.name not in fig2)


def assumption1_methods() -> tuple:
    """The methods whose damping the experiment raises to satisfy Assumption 1."""
    return tuple(s.name for s in method_specs() if s.assumption1)


def large_model_skips() -> tuple:
    """((method, reason), ...) of the methods the paper's ResNet-9 and text runs skip."""
    return tuple((s.name, s.large_model_skip) for s in method_specs() if s.large_model_skip)


def check_settings(settings: Mapping) -> None:
    """That ``settings`` ({method: {field: value}}) names registered methods and fields of
    their configs: a ValueError naming the first unknown one otherwise."""
    for name, fields in settings.items():
        spec = method_spec(name)
        if not isinstance(fields, Mapping):
            raise ValueError(f"the settings of method {name!r} must be a mapping of its "
                             f"config's fields to values, got {fields!r}")
        spec.check_fields(fields)


class Registry(Mapping):
    """A live read-only view of the registry: method name -> the module implementing it
    (``fimoda.influence.METHODS``); it follows :func:`register` and :func:`unregister`."""

    def __getitem__(self, name: str) -> str:
        reg = _load()
        if name not in reg:
            raise KeyError(name)
        return reg[name].module

    def __iter__(self) -> Iterator[str]:
        return iter(tuple(_load()))

    def __len__(self) -> int:
        return len(_load())

    def __repr__(self) -> str:
        return f"METHODS({dict(self)!r})"
