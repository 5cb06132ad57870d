"""One spec per dataset: everything the experiment knows about a data set, in one place.

A dataset is its loader module (``fimoda/data/<module>.py``: raw files -> arrays) plus one
:class:`DatasetSpec`, registered with :func:`register_dataset` (the paper's eight are in
:mod:`fimoda.data.catalog`). Every per-dataset table of the experiment is a view of the
registry, computed anew on each call, so a dataset registered later appears in all of them:

- :func:`dataset_names`: every registered name (``fimoda.paper.config.DATASET_NAMES``, old name
  ``fimoda.paper.config.DATASETS``), in registration order;
- :func:`tabular_names`: those with the tabular MLP (``fimoda.paper.config.TABULAR``);
- :func:`stand_ins`: stand-in -> the paper's dataset it replaces
  (``fimoda.paper.config.STAND_INS``);
- :func:`default_datasets`: what a profile runs without ``--datasets``
  (``fimoda.paper.config.PROFILE_DATASETS``);
- :func:`fig2_panel_order`: the panels of the paper's Figure 2 (``fimoda.paper.plots.FIG2_ORDER``);
- :func:`cost_order`: the pipeline's start order (``fimoda.paper.pipeline.COST_ORDER``);
- :data:`fimoda.data.LOADERS` (old name ``fimoda.data.DATASETS``): name -> :class:`Loader`.

:func:`fimoda.paper.config.get_config` builds a dataset's config from its spec: the paper's
settings (``train``, ``further``, ``methods``, ``dtype``, ``encoder``), then the profile's
:class:`Overrides`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional

from ..losses import TASKS
from ..settings import (ExperimentConfig, FurtherTrainConfig, MethodConfig, TrainConfig,
                        YardstickConfig, apply_method_overrides)
from .dataset import LOADERS, Loader

__all__ = ["DatasetSpec", "Loader", "Overrides", "MODELS", "PROFILES", "register_dataset",
           "unregister_dataset", "get_spec", "dataset_names", "tabular_names", "stand_ins",
           "default_datasets", "fig2_panel_order", "cost_order"]

MODELS = ("mlp", "resnet9", "text")     # the model families fimoda.models builds
# the settings profiles a spec may change the paper's settings for (fimoda.paper.config applies
# them): smoke (seconds per notebook, the tests), cpu (the pipeline on 2 cores), paper (the paper's
# own)
PROFILES = ("smoke", "cpu", "paper")
# ExperimentConfig's fields that a spec sets itself and no profile overrides
_FIXED = ("dataset", "profile", "task", "model", "train", "further", "methods", "stand_in_for")


@dataclass(frozen=True)
class Overrides:
    """A profile's changes to a dataset's paper settings, field by field (each printed by
    :func:`fimoda.paper.config.reductions` and in every notebook's banner)."""
    # TrainConfig fields -> value (training of theta^f)
    train: dict = field(default_factory=dict)
    # FurtherTrainConfig fields -> value (the gold standard's further training)
    further: dict = field(default_factory=dict)
    # the approximations' settings: MethodConfig's experiment-wide fields -> value, and under a
    # method's name {its config field: value} (``skip`` adds to the paper's skips)
    methods: dict = field(default_factory=dict)
    # ExperimentConfig's own fields -> value; in practice the model's size (``width`` of
    # ResNet-9, ``trainable_layers`` of the encoder)
    model_size: dict = field(default_factory=dict)
    # notebook 08's settings (:class:`fimoda.settings.YardstickConfig` fields -> value)
    yardsticks: dict = field(default_factory=dict)

    def check(self, where: str) -> None:
        """One ValueError naming the first field no config class has."""
        try:                          # experiment-wide fields and {method: {field: value}}
            apply_method_overrides(MethodConfig(), self.methods)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
        for part, cls in (("train", TrainConfig), ("further", FurtherTrainConfig),
                          ("model_size", ExperimentConfig)):
            known = {f.name for f in dataclasses.fields(cls)} - (
                set(_FIXED) if cls is ExperimentConfig else set())
            bad = sorted(set(getattr(self, part)) - known)
            if bad:
                raise ValueError(f"{where}: {part} overrides unknown field(s) {bad}; "
                                 f"fields: {sorted(known)}")
        try:
            dataclasses.replace(YardstickConfig(), **self.yardsticks)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{where}: yardsticks overrides: {e}") from None


@dataclass(frozen=True)
class DatasetSpec:
    """Everything fimoda's experiment needs to know about one dataset."""
    # the name every function, parameter and file uses (results/<profile>/<name>/)
    name: str
    # how its raw files become arrays; holds its task and what it stands in for
    loader: Loader
    # the model family trained on it: "mlp" (tabular), "resnet9" (images) or "text" (encoder)
    model: str
    # The paper's settings (App. D); the ``paper`` profile is exactly these.
    # how the final model theta^f is trained (App. D.2)
    train: TrainConfig
    # the gold standard's further training from theta^f: optimizer, epochs or steps, seeds, the
    # left-out and test instances, the leave-out mechanism (App. D.3)
    further: FurtherTrainConfig
    # the approximations' settings: damping grid, LiSSA depth and scale, TRAK's dimension,
    # methods skipped and why (App. D.4)
    methods: MethodConfig = field(default_factory=MethodConfig)
    # floating-point type of the model and every computation: "float64" or "float32"
    dtype: str = "float64"
    # text: the pretrained encoder (Hugging Face name or path); None for the other models
    encoder: Optional[str] = None
    # a stand-in (loader.stand_in_for set): why the original is not used, shown in the banner
    stand_in_why: Optional[str] = None
    # its panel's position in the paper's Figure 2, 0 for (a); a stand-in takes its original's
    # place; None: no panel of the paper's (drawn after those that are)
    fig2_panel: Optional[int] = None
    # position of its notebook chain in the pipeline's start order when several datasets run at
    # once (0: started first); the longest chains go first, so none is left running alone
    cost_rank: int = 0
    # the profiles that run it when no datasets are named (run_all.sh, notebooks 00 and 05)
    default_in: tuple = ()
    # profile name -> that profile's Overrides of the paper settings (none: the paper's)
    profiles: dict = field(default_factory=dict)

    @property
    def task(self) -> str:
        """The task: "regression" or "classification" (the loader's)."""
        return self.loader.task

    @property
    def stand_in_for(self) -> Optional[str]:
        """The paper's dataset this one replaces, or None (the loader's)."""
        return self.loader.stand_in_for

    def check(self) -> None:
        """One ValueError naming the first inconsistent field."""
        where = f"dataset spec {self.name!r}"
        if not self.name or not self.name.isidentifier():
            raise ValueError(f"{where}: the name must be a Python identifier (it names files)")
        if self.task not in TASKS:
            raise ValueError(f"{where}: task {self.task!r} is not one of {TASKS}")
        if self.model not in MODELS:
            raise ValueError(f"{where}: model {self.model!r} is not one of {MODELS}")
        if self.dtype not in ("float32", "float64"):
            raise ValueError(f"{where}: dtype {self.dtype!r} is not float32 or float64")
        if bool(self.stand_in_for) != bool(self.stand_in_why):
            raise ValueError(f"{where}: a stand-in needs stand_in_why, and only a stand-in has it")
        for p in set(self.default_in) | set(self.profiles):
            if p not in PROFILES:
                raise ValueError(f"{where}: unknown profile {p!r}; profiles: {PROFILES}")
        for p, o in self.profiles.items():
            if not isinstance(o, Overrides):
                raise ValueError(f"{where}: profiles[{p!r}] must be an Overrides")
            o.check(f"{where}, profile {p!r}")


_SPECS: dict[str, DatasetSpec] = {}


def register_dataset(spec: DatasetSpec) -> DatasetSpec:
    """Add ``spec`` to the registry (and its loader to :data:`fimoda.data.LOADERS`): from now on
    :func:`fimoda.paper.config.get_config`, :func:`fimoda.data.load_dataset`, the pipeline and the
    figures know it. A name already registered, or an inconsistent spec, is one ValueError and
    registers nothing. Returns ``spec``."""
    spec.check()
    if spec.name in _SPECS:
        raise ValueError(f"dataset {spec.name!r} is already registered")
    _SPECS[spec.name] = spec
    LOADERS[spec.name] = spec.loader
    return spec


def unregister_dataset(name: str) -> None:
    """Remove dataset ``name`` from the registry and from :data:`fimoda.data.LOADERS`."""
    get_spec(name)
    del _SPECS[name]
    del LOADERS[name]


def get_spec(name: str) -> DatasetSpec:
    """The spec registered as ``name``; an unknown name is one ValueError naming them all."""
    if name not in _SPECS:
        raise ValueError(f"unknown dataset {name!r}; choose from {', '.join(_SPECS)}")
    return _SPECS[name]


def dataset_names() -> tuple:
    """Every registered dataset's name, in registration order."""
    return tuple(_SPECS)


def tabular_names() -> tuple:
    """The datasets whose model is the tabular MLP, in registration order."""
    return tuple(n for n, s in _SPECS.items() if s.model == "mlp")


def stand_ins() -> dict:
    """Stand-in name -> the name of the paper's dataset it replaces."""
    return {n: s.stand_in_for for n, s in _SPECS.items() if s.stand_in_for}


def fig2_panel_order() -> tuple:
    """The datasets with a panel in the paper's Figure 2, in panel order (a stand-in right
    after its original, in registration order)."""
    order = list(_SPECS)
    return tuple(sorted((n for n in order if _SPECS[n].fig2_panel is not None),
                        key=lambda n: (_SPECS[n].fig2_panel, order.index(n))))


def default_datasets(profile: str) -> tuple:
    """The datasets ``profile`` runs when none are named, in Figure 2's panel order (datasets
    without a panel after those, in registration order)."""
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; choose from {PROFILES}")
    panels = fig2_panel_order()
    order = panels + tuple(n for n in _SPECS if n not in panels)
    return tuple(n for n in order if profile in _SPECS[n].default_in)


def cost_order() -> tuple:
    """Every dataset in the order the pipeline starts their notebook chains when several run at
    once (by ``cost_rank``, ties in registration order)."""
    order = list(_SPECS)
    return tuple(sorted(order, key=lambda n: (_SPECS[n].cost_rank, order.index(n))))
