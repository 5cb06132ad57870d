"""The paper's experiment configuration: a dataset's config under a profile, and what a profile
changed.

Each dataset's numbers (the paper's settings and every profile's reductions, with their reasons)
are in its spec (:mod:`fimoda.data.specs`; the paper's datasets: :mod:`fimoda.data.catalog`);
:func:`get_config` builds the config from it. The ``paper`` profile is exactly the paper (App. D).
``cpu`` is the default of ``run_all.sh`` and reduces seeds, epochs and subsets so the whole
pipeline fits its budget (README) on 2 cores; every reduction is listed by :func:`reductions`.
``smoke`` takes seconds per notebook and is what the tests run.

The config classes are the core's (:mod:`fimoda.settings`, :mod:`fimoda.training.baselines`) and
are importable from here too.
"""
from __future__ import annotations

import dataclasses
from dataclasses import replace
from typing import Optional

from ..data.specs import PROFILES, get_spec
from ..settings import (DAMPING_GRID, DEFAULT_ENCODER, ExperimentConfig, FurtherTrainConfig,
                        MethodConfig, TrainConfig, YardstickConfig, apply_method_overrides)
from ..training.baselines import FINAL_MODEL_MARGIN, BaselineMargin

__all__ = ["PROFILES", "get_config", "gold_variant", "reductions", "describe", "paper_config",
           "DAMPING_GRID", "DEFAULT_ENCODER", "ExperimentConfig", "FurtherTrainConfig",
           "MethodConfig", "TrainConfig", "apply_method_overrides", "FINAL_MODEL_MARGIN",
           "BaselineMargin", "YardstickConfig", "YARDSTICK_DATASETS", "yardsticks_left_out",
           "LORA_DATASETS", "FULL_YARDSTICKS", "yardstick_config", "yardstick_reductions"]


def paper_config(dataset: str) -> ExperimentConfig:
    """``dataset``'s config at the paper's settings (its :class:`fimoda.data.specs.DatasetSpec`)."""
    s = get_spec(dataset)
    return ExperimentConfig(dataset, "paper", s.task, s.model, dtype=s.dtype, encoder=s.encoder,
                            train=s.train, further=s.further, methods=s.methods,
                            stand_in_for=s.stand_in_for)


def get_config(dataset: str, profile: str = "cpu", **overrides) -> ExperimentConfig:
    """The config of ``dataset`` under ``profile``; ``overrides`` replace top-level fields."""
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; choose from {PROFILES}")
    if overrides.get("dtype") is not None and overrides["dtype"] not in ("float32", "float64"):
        raise ValueError(f"dtype {overrides['dtype']!r} is not supported: choose float32 or "
                         "float64 (the gold standard's scores are tiny differences of losses)")
    cfg = paper_config(dataset)
    changes = get_spec(dataset).profiles.get(profile)      # this profile's Overrides, if any
    for part in ("train", "further") if changes is not None else ():
        if getattr(changes, part):
            cfg = replace(cfg, **{part: replace(getattr(cfg, part), **getattr(changes, part))})
    if changes is not None and changes.methods:
        cfg = replace(cfg, methods=apply_method_overrides(cfg.methods, changes.methods))
    cfg = replace(cfg, profile=profile, **(changes.model_size if changes is not None else {}))
    return replace(cfg, **overrides) if overrides else cfg


def gold_variant(cfg: ExperimentConfig, optimizer: Optional[str] = None,
                 mechanism: Optional[str] = None) -> ExperimentConfig:
    """``cfg`` with its further training as a variant runs it: ``optimizer`` and ``mechanism``
    (None: the dataset's), Adam over ``adam_epochs`` where the profile sets them (as
    :func:`fimoda.paper.experiment.run_gold` does)."""
    fc = cfg.further
    changes = {k: v for k, v in (("optimizer", optimizer), ("mechanism", mechanism)) if v}
    if optimizer == "adam" and fc.adam_epochs is not None:
        changes["epochs"] = fc.adam_epochs
    return dataclasses.replace(cfg, further=dataclasses.replace(fc, **changes)) if changes else cfg


def _method_settings(m: MethodConfig) -> dict:
    """{(method, field): value} of every method field that ``m`` sets explicitly."""
    return {(name, k): v for name, values in m.settings.items() for k, v in values.items()}


def reductions(cfg: ExperimentConfig) -> list[str]:
    """Human-readable list of the settings in ``cfg`` that differ from the paper profile."""
    paper = paper_config(cfg.dataset)
    out = []
    for part in ("train", "further", "methods"):
        a, b = getattr(paper, part), getattr(cfg, part)
        for f in dataclasses.fields(a):
            va, vb = getattr(a, f.name), getattr(b, f.name)
            if va != vb and f.name != "settings":
                out.append(f"{part}.{f.name}: {va} -> {vb}")
    keys = dict.fromkeys([*_method_settings(paper.methods), *_method_settings(cfg.methods)])
    for name, k in keys:
        va, vb = paper.methods.setting(name, k), cfg.methods.setting(name, k)
        if va != vb:
            out.append(f"methods.{name}.{k}: {va} -> {vb}")
    for name in ("dtype", "encoder", "width", "trainable_layers"):
        if getattr(paper, name) != getattr(cfg, name):
            out.append(f"{name}: {getattr(paper, name)} -> {getattr(cfg, name)}")
    return out


def describe(cfg: ExperimentConfig) -> str:
    """The banner as plain text, for logs and the command line: stand-ins, the model, the gold
    standard and each change from the paper on its own line with its reason
    (:func:`fimoda.paper.banner.banner_text`; notebooks show it as a table)."""
    from .banner import banner_text
    return banner_text(cfg)


# The per-dataset tables, views of the dataset specs (fimoda.data.specs), computed on each access
_VIEWS = {
    "DATASET_NAMES": "dataset_names",       # every registered dataset, in registration order
    "DATASETS": "dataset_names",            # the old name of DATASET_NAMES
    "TABULAR": "tabular_names",             # those whose model is the tabular MLP
    "STAND_INS": "stand_ins",               # stand-in -> the paper's dataset it replaces
}


def __getattr__(name: str):
    """``DATASET_NAMES`` (old name ``DATASETS``), ``TABULAR``, ``STAND_INS`` and
    ``PROFILE_DATASETS`` (profile -> the datasets it runs when none are named), each computed
    from the registered dataset specs when read."""
    from ..data import specs
    if name in _VIEWS:
        return getattr(specs, _VIEWS[name])()
    if name == "PROFILE_DATASETS":
        return {p: specs.default_datasets(p) for p in PROFILES}
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# The datasets the pipeline runs notebook 08 for, per profile: the paper profile the three small
# tabular models (Concrete, Energy, FICO); smoke and cpu one regression and one classification
# set (Energy's notebook 08 took 1:26 on 2 cores, which the cpu profile's 40 minutes lack);
# any tabular dataset runs it by hand (the README's notebook table says how)
YARDSTICK_DATASETS = {"paper": ("concrete", "energy", "fico"), "cpu": ("concrete", "fico"),
                      "smoke": ("concrete", "fico")}


def yardsticks_left_out(profile: str, datasets) -> list[str]:
    """The datasets among ``datasets`` whose notebook 08 the paper profile runs and ``profile``
    does not (the pipeline prints them as a reduction)."""
    return [d for d in datasets
            if d in YARDSTICK_DATASETS["paper"] and d not in YARDSTICK_DATASETS.get(profile, ())]


# ... and its LoRA section for (the text encoder; sections 1-3 print why they skip it)
LORA_DATASETS = ("sst2",)
# The yardsticks' full settings per profile, against which a profile's reductions are printed:
# YardstickConfig's defaults (M = 100 subsets, as TRAK's LDS) for paper, M = 50 for cpu
FULL_YARDSTICKS = {"paper": YardstickConfig(),
                    "cpu": YardstickConfig(lds_subsets=50, retrain_subsets=50)}


def yardstick_config(dataset: str, profile: str) -> YardstickConfig:
    """Notebook 08's settings for ``dataset`` under ``profile``: :class:`YardstickConfig`'s
    defaults, with the profile's ``yardsticks`` overrides of the dataset spec."""
    from ..data.specs import get_spec
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; choose from {PROFILES}")
    changes = get_spec(dataset).profiles.get(profile)
    return replace(YardstickConfig(), **(changes.yardsticks if changes is not None else {}))


def yardstick_reductions(ycfg: YardstickConfig, profile: str) -> list[str]:
    """Each setting of ``ycfg`` that differs from the full settings of ``profile``
    (:data:`FULL_YARDSTICKS`; the cpu profile's for smoke), as "name: full -> here"."""
    full = FULL_YARDSTICKS.get(profile, FULL_YARDSTICKS["cpu"])
    return [f"{f.name}: {getattr(full, f.name)} -> {getattr(ycfg, f.name)}"
            for f in dataclasses.fields(ycfg) if getattr(full, f.name) != getattr(ycfg, f.name)]

