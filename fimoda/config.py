"""Experiment configuration: one config per dataset holding the paper's numbers, and profiles.

The ``paper`` profile is exactly the paper (App. D and the issues' tables). ``cpu`` is the default
of ``run_all.sh`` and reduces seeds, epochs and subsets so the whole pipeline fits its budget
(README) on 2 cores; every reduction is listed by :func:`reductions`. ``smoke`` takes seconds per
notebook and is what the tests run.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, replace
from typing import Optional

# The damping grid of the paper (App. D.4), multiples of lambda_G (Energy: x10): the methods' own
from .influence.common import DAMPING_GRID

PROFILES = ("smoke", "cpu", "paper")
TABULAR = ("concrete", "energy", "fico", "folktables", "adult")
DATASETS = TABULAR + ("cifar10", "fashion_mnist", "sst2")
# Offline stand-ins (see ../shared/data/README.md): labelled as such in every output.
STAND_INS = {"adult": "folktables", "fashion_mnist": "cifar10"}


@dataclass(frozen=True)
class TrainConfig:
    """How the final model theta^f is trained (paper App. D.2)."""
    optimizer: str = "sgd"          # sgd | adamw
    lr: float = 0.3
    epochs: int = 1000
    batch_size: int = 128
    weight_decay: float = 0.0
    grad_clip: Optional[float] = None
    select_epoch_by_val: bool = False  # text: keep the epoch with best validation accuracy
    seed: int = 0                      # init and batch-order seed
    n_train_subset: Optional[int] = None  # reduced profiles only (printed)
    eval_rows: Optional[int] = None  # final train/test metrics on at most this many rows of each


@dataclass(frozen=True)
class FurtherTrainConfig:
    """Further training A' from theta^f: the gold standard (paper §3, App. D.3)."""
    optimizer: str = "sgd"          # sgd | adam | adamw
    lr: float = 3e-2
    adam_lr: float = 1e-4           # lr used when optimizer == "adam" (App. E.1)
    adam_epochs: Optional[int] = None  # epochs when optimizer == "adam" (None: ``epochs``)
    epochs: int = 500
    max_steps: Optional[int] = None  # image/text: stop after this many steps
    eval_every: Optional[int] = None  # None: evaluate after every epoch; k: every k steps
    batch_size: int = 128
    weight_decay: float = 0.0
    grad_clip: Optional[float] = None
    n_loo: int = 100
    loo_selection: str = "stride"   # stride (regression, paper) | random (seed 0)
    loo_stride: int = 9
    n_test: Optional[int] = None    # None: all test points
    test_selection: str = "first"   # first | random
    seeds: int = 100
    # how z_i is left out (fimoda.gold): the paper's text (App. D.3) and its SST-2
    # code subtract a scaled loss term; the reference code behind its tabular figures removes z_i
    # from each epoch's sampler order. Each dataset defaults to what produced its figures.
    mechanism: str = "subtract"
    mislabel_trials: int = 40       # mislabelled-example detection (App. E.2.1): trials averaged
    mislabel_seeds: Optional[int] = None   # seeds of its one-epoch further training (None: seeds)
    mislabel_skip: Optional[str] = None    # why a reduced profile does not run it (printed)


@dataclass(frozen=True)
class BaselineMargin:
    """How clearly every final model theta^f must beat its trivial predictor on the test rows
    (:mod:`fimoda.baselines`): the same margin in every profile and for every dataset.
    :func:`fimoda.train.train_final_model` refuses to save, and ``load_final_model`` to load, a
    model that does not clear it."""
    # classification: test error rate (1 - accuracy) at most this times the majority class's
    # (1 - majority rate), i.e. right on at least a fifth of the rows the majority class gets wrong
    error_ratio: float = 0.8
    # classification: test cross-entropy (nats per row) at most this times the class-prior
    # predictor's (class frequencies of the training rows)
    cross_entropy_ratio: float = 0.95
    # regression: test MSE at most this times that of the training rows' mean (R^2 measured
    # against the training mean at least 1 - mse_ratio)
    mse_ratio: float = 0.5

    def __post_init__(self):
        for name in ("error_ratio", "cross_entropy_ratio", "mse_ratio"):
            v = getattr(self, name)
            if not 0 < v <= 1:
                raise ValueError(f"BaselineMargin.{name} must lie in (0, 1], got {v}")


# The margin applied to every final model (the default of train_final_model/load_final_model)
FINAL_MODEL_MARGIN = BaselineMargin()


@dataclass(frozen=True)
class MethodConfig:
    """Settings of the gradient-based approximations (paper App. D.4): the experiment-wide ones
    below, which reach every method whose spec takes them (:attr:`MethodSpec.shared
    <fimoda.influence.specs.MethodSpec>`), and each method's own by name in ``settings``."""
    damping_grid: tuple = DAMPING_GRID
    # the reference notebooks (IBM/fimoda) compute CG and LiSSA over the whole grid and plot the
    # largest damping (cg[..., 3], lissa[..., 3]); LiSSA-H "with largest damping value"
    damping_index: int = 3
    memory_gb: float = 8.0                     # budget for materialising output gradients
    grad_chunk: int = 256
    # training rows (seed 0, the left-out rows always among them) on which every training-set-wide
    # quantity is estimated: Hessian products, EK-FAC factors, TRAK's kernel (None: all n). Only
    # mean-risk operators: the generalized influence functions (sum risk) must be skipped with it
    fit_rows: Optional[int] = None
    # methods not run, with the reason the notebooks print: ((name, reason), ...)
    skip: tuple = ()
    # methods also run at every damping of the grid (notebook 03), for the damping-sweep figure
    # of notebook 04 (the paper, Sec. 7: damping moves a method between first- and second-order).
    # The exact Gauss-Newton solve: what CG converges to, without CG's iterations, which at the
    # grid's small dampings (ill-conditioned) cost many times the largest's
    damping_sweep: tuple = ("dense",)
    # each method's own settings by name, {method: {config field: value}}; a field not named
    # keeps its config's default (fimoda.influence.specs: every method's config and defaults)
    settings: dict = field(default_factory=dict)

    def __post_init__(self):
        named = [n for n, _ in self.skip] + list(self.damping_sweep) + list(self.settings)
        if named:                        # an unknown method or field: one error naming it
            from .influence.specs import check_settings, method_spec
            for name in named:
                method_spec(name)
            check_settings(self.settings)
        object.__setattr__(self, "settings", {k: dict(v) for k, v in self.settings.items()})

    def setting(self, method: str, name: str):
        """Field ``name`` of ``method``'s config as this config sets it: its value in
        ``settings``, else the config's own default; an unknown method or field is a
        ValueError naming it."""
        from .influence.specs import method_spec
        spec = method_spec(method)
        spec.check_fields([name])
        if name in self.settings.get(method, {}):
            return self.settings[method][name]
        return {f.name: f for f in dataclasses.fields(spec.config)}[name].default


@dataclass(frozen=True)
class ExperimentConfig:
    dataset: str
    profile: str
    task: str                      # regression | classification
    model: str                     # mlp | resnet9 | text
    dtype: str = "float64"
    encoder: Optional[str] = None  # text: HF model name or path
    width: int = 64                # resnet9: channels of the prep layer (64-128-256-512 at 64)
    # text: train, further-train and attribute only the top k encoder layers and the head; the
    # frozen pretrained trunk below them runs once per sentence (None: every parameter, as the
    # paper did)
    trainable_layers: Optional[int] = None
    train: TrainConfig = field(default_factory=TrainConfig)
    further: FurtherTrainConfig = field(default_factory=FurtherTrainConfig)
    methods: MethodConfig = field(default_factory=MethodConfig)
    stand_in_for: Optional[str] = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


DEFAULT_ENCODER = "sentence-transformers/all-MiniLM-L6-v2"


def _skip_large() -> tuple:
    """ResNet-9 and the encoder: what the paper did not run either, and why (the methods'
    specs say it)."""
    from .influence.specs import large_model_skips
    return large_model_skips()


def _large_settings(batch_size: int) -> dict:
    """The paper's methods on ResNet-9 and the encoder: TRAK at k = 4096, LiSSA's products on
    batches of the training batch size, DataInf's per-layer damping from 1,000 rows."""
    return {"trak": {"proj_dim": 4096}, "lissa": {"batch_size": batch_size},
            "lissa_h": {"batch_size": batch_size}, "datainf": {"n_samples": 1000}}


def _paper(dataset: str) -> ExperimentConfig:
    if dataset in ("concrete", "energy"):
        return ExperimentConfig(
            dataset, "paper", "regression", "mlp",
            train=TrainConfig(lr=0.3, epochs=1000),
            further=FurtherTrainConfig(lr=3e-2, adam_lr=1e-4, epochs=500, n_loo=100,
                                       loo_selection="stride", mechanism="remove",
                                       loo_stride=9 if dataset == "concrete" else 7),
            methods=MethodConfig(damping_grid=DAMPING_GRID if dataset == "concrete"
                                 else (1.0, 10.0, 100.0, 1000.0)),
        )
    if dataset == "fico":
        return ExperimentConfig(
            dataset, "paper", "classification", "mlp",
            train=TrainConfig(lr=1e-3, epochs=1000),
            further=FurtherTrainConfig(lr=1e-4, adam_lr=1e-6, epochs=200, n_loo=100,
                                       loo_selection="random", n_test=100, mechanism="remove"),
        )
    if dataset in ("folktables", "adult"):
        return ExperimentConfig(
            dataset, "paper", "classification", "mlp",
            train=TrainConfig(lr=1e-2, epochs=100),
            further=FurtherTrainConfig(lr=1e-4, adam_lr=1e-6, epochs=25, n_loo=100,
                                       loo_selection="random", n_test=100, mechanism="remove"),
            methods=MethodConfig(settings={"lissa": {"scale": 20.0},
                                           "lissa_h": {"scale": 200.0}}),
            stand_in_for=STAND_INS.get(dataset),
        )
    if dataset in ("cifar10", "fashion_mnist"):
        return ExperimentConfig(
            dataset, "paper", "classification", "resnet9", dtype="float32",
            train=TrainConfig(lr=0.4, epochs=50, batch_size=512, weight_decay=1e-3),
            further=FurtherTrainConfig(lr=0.04, epochs=1, max_steps=50, eval_every=1,
                                       batch_size=512, weight_decay=1e-3, n_loo=50,
                                       loo_selection="random", n_test=100,
                                       test_selection="random"),
            methods=MethodConfig(grad_chunk=64, skip=_skip_large(), damping_sweep=(),
                                 settings=_large_settings(512)),
            stand_in_for=STAND_INS.get(dataset),
        )
    if dataset == "sst2":
        return ExperimentConfig(
            dataset, "paper", "classification", "text", dtype="float32",
            encoder=DEFAULT_ENCODER,
            train=TrainConfig(optimizer="adamw", lr=1e-5, epochs=20, batch_size=64,
                              grad_clip=1.0, select_epoch_by_val=True),
            further=FurtherTrainConfig(optimizer="adamw", lr=1e-6, epochs=1, eval_every=5,
                                       batch_size=64, grad_clip=1.0, n_loo=50,
                                       loo_selection="random", n_test=100),
            methods=MethodConfig(grad_chunk=16, skip=_skip_large(), damping_sweep=(),
                                 settings=_large_settings(64)),
        )
    raise ValueError(f"unknown dataset {dataset!r}; choose from {DATASETS}")


# LiSSA-H runs as in the paper (full-batch true-Hessian products, depth 5000) in every profile but
# smoke: its truncated series is evaluated in a block Krylov subspace
# (fimoda.influence.solvers.lissa.krylov_lissa_solve), a few dozen block products instead of 5000.
# Reductions applied on top of the paper settings. Each entry is printed by `reductions()`.
# The gold standard is most of the cpu profile's time on 2 cores: Concrete and Energy keep a fifth
# of the paper's further training with 4 of its 100 seeds, FICO 10 of 200 epochs with 4 seeds
# (cosines to gold rise with the seeds averaged: notebook 04 draws that curve for the seeds run);
# the classifiers attribute 50 of the paper's 100 test points.
# Folktables/Adult train theta^f on 4,000 rows with the paper's lr (1e-2) and 100 epochs: 3,200
# SGD steps, where the paper's 30,000 rows make 23,500. Its 20 epochs before (640 steps) left a
# classifier that predicted the majority class for every row (fimoda.baselines refuses it now).
# Images and text on 2 cores: ResNet-9 at width 16 (0.41 M parameters) on 10,000 training images;
# the encoder's top layers only (trainable_layers) on 16,000 sentences; Hessian products,
# factors and TRAK's kernel from 256 training rows; short LiSSA series on small batches.
# A profile's ``methods`` entry sets experiment-wide fields of MethodConfig (fit_rows, ...) and,
# under a method's name, that method's config fields; its ``skip`` adds to the paper's skips.
_CPU_LARGE_METHODS = dict(fit_rows=256, lissa=dict(depth=50, batch_size=32),
                          lissa_h=dict(depth=20, batch_size=32), arnoldi=dict(rank=10, n_iter=12),
                          trak=dict(proj_dim=512), datainf=dict(n_samples=256))
# The encoder's top 3 layers (5.3 M parameters) on 2 cores: one true-Hessian product on a batch
# of sentences costs about as much as a training step, per column, so LiSSA-H (one column per
# test point at every step) is skipped as the paper skipped it; its Gauss-Newton LiSSA runs 20
# steps, its scale grid starting at 20 (10 diverged on this profile's theta^f); TRAK projects to
# 256 dimensions (its random 5.3 M x k matrix is generated anew for each chunk of rows); every
# training-set-wide quantity comes from 128 rows.
_CPU_TEXT_METHODS = dict(
    _CPU_LARGE_METHODS, fit_rows=128, datainf=dict(n_samples=128),
    lissa=dict(depth=20, batch_size=32, scale=20.0), trak=dict(proj_dim=256),
    skip=(("lissa_h", "true-Hessian products on the encoder cost one double "
                      "backward pass per test point per step (the paper ran out of GPU "
                      "memory; on 2 CPU cores it would outlast the whole profile)"),))
# Mislabelled-example detection flips 20 % of the left-out set: 2 of the cpu profile's 10 SST-2
# sentences, whose AUC can only be 0, 1/2 or 1 (one trial of it gave 0 on one theta^f, 1 on another)
_SST2_CPU_MISLABEL = ("2 flipped sentences among the cpu profile's 10 left out give an AUC of 0, "
                      "1/2 or 1, which says nothing; the paper profile runs it (10 of 50 flipped, "
                      "40 trials)")
_CPU_MODEL = {"cifar10": dict(width=16), "fashion_mnist": dict(width=16),
              "sst2": dict(trainable_layers=3)}
# The Adam gold standard of App. E.1 (Figs. 4, 8) runs for every tabular dataset too, over half
# the SGD run's epochs where that is more than a few.
_CPU = {
    "concrete": dict(further=dict(epochs=100, adam_epochs=50, seeds=4)),
    "energy": dict(further=dict(epochs=100, adam_epochs=50, seeds=4)),
    "fico": dict(train=dict(epochs=200), further=dict(epochs=10, adam_epochs=5, seeds=4,
                                                      n_test=50, mislabel_trials=2)),
    "folktables": dict(train=dict(n_train_subset=4000),
                       further=dict(epochs=5, seeds=4, n_test=50, mislabel_trials=2)),
    "adult": dict(train=dict(n_train_subset=4000),
                  further=dict(epochs=5, seeds=4, n_test=50, mislabel_trials=2)),
    "cifar10": dict(train=dict(epochs=5, n_train_subset=10000, batch_size=256),
                    further=dict(max_steps=10, batch_size=128, n_loo=10, n_test=20, seeds=2),
                    methods=_CPU_LARGE_METHODS),
    "fashion_mnist": dict(train=dict(epochs=5, n_train_subset=10000, batch_size=256),
                          further=dict(max_steps=10, batch_size=128, n_loo=10, n_test=20, seeds=2),
                          methods=_CPU_LARGE_METHODS),
    "sst2": dict(train=dict(lr=2e-4, epochs=1, n_train_subset=16000, select_epoch_by_val=False,
                            eval_rows=2000),
                 further=dict(max_steps=10, n_loo=10, n_test=20, seeds=2,
                              mislabel_skip=_SST2_CPU_MISLABEL),
                 methods=_CPU_TEXT_METHODS),
}
_SMOKE_METHODS = dict(lissa=dict(depth=300), lissa_h=dict(depth=100, batch_size=128),
                      arnoldi=dict(rank=10), trak=dict(proj_dim=256))
_SMOKE_LARGE_METHODS = dict(fit_rows=64, lissa=dict(depth=10, batch_size=32),
                            lissa_h=dict(depth=10, batch_size=32), arnoldi=dict(rank=4, n_iter=6),
                            trak=dict(proj_dim=128), datainf=dict(n_samples=64))
_SMOKE_MODEL = {"cifar10": dict(width=8), "fashion_mnist": dict(width=8),
                "sst2": dict(trainable_layers=2)}
# Smoke models still learn (fimoda.baselines refuses one that does not beat its trivial
# predictor): Concrete 40 epochs, FICO and Folktables/Adult a larger lr on their 1,000 rows,
# ResNet-9 8 epochs on its 512 images (32 steps; its metrics on 1,000 rows of each set), SST-2
# the cpu profile's lr on 512 sentences.
_SMOKE = {
    "concrete": dict(train=dict(epochs=40), further=dict(mislabel_trials=1, epochs=3, seeds=2, n_loo=8, n_test=6),
                     methods=_SMOKE_METHODS),
    "energy": dict(train=dict(epochs=20), further=dict(mislabel_trials=1, epochs=3, seeds=2, n_loo=8, n_test=6),
                   methods=_SMOKE_METHODS),
    "fico": dict(train=dict(lr=1e-2, epochs=10, n_train_subset=1000), further=dict(mislabel_trials=1, epochs=2, seeds=2, n_loo=8, n_test=6),
                 methods=_SMOKE_METHODS),
    "folktables": dict(train=dict(lr=0.1, epochs=30, n_train_subset=1000), further=dict(mislabel_trials=1, epochs=1, seeds=2, n_loo=8, n_test=6),
                       methods=_SMOKE_METHODS),
    "adult": dict(train=dict(lr=0.1, epochs=30, n_train_subset=1000), further=dict(mislabel_trials=1, epochs=1, seeds=2, n_loo=8, n_test=6),
                  methods=_SMOKE_METHODS),
    "cifar10": dict(train=dict(epochs=8, n_train_subset=512, batch_size=128, eval_rows=1000),
                    further=dict(mislabel_trials=1, max_steps=2, batch_size=128, n_loo=4, n_test=4, seeds=2),
                    methods=_SMOKE_LARGE_METHODS),
    "fashion_mnist": dict(train=dict(epochs=8, n_train_subset=512, batch_size=128,
                                     eval_rows=1000),
                          further=dict(mislabel_trials=1, max_steps=2, batch_size=128, n_loo=4, n_test=4, seeds=2),
                          methods=_SMOKE_LARGE_METHODS),
    "sst2": dict(train=dict(lr=2e-4, epochs=1, n_train_subset=512, select_epoch_by_val=False),
                 further=dict(mislabel_trials=1, max_steps=2, n_loo=4, n_test=4, seeds=2),
                 methods=_SMOKE_LARGE_METHODS),
}
# Datasets each profile runs by default in run_all.sh (the offline stand-ins where the
# originals cannot be had here; pass --datasets to choose others).
PROFILE_DATASETS = {
    "smoke": ("concrete",),
    "cpu": ("concrete", "energy", "fico", "adult", "fashion_mnist", "sst2"),
    "paper": ("concrete", "energy", "fico", "folktables", "cifar10", "sst2"),
}


def get_config(dataset: str, profile: str = "cpu", **overrides) -> ExperimentConfig:
    """The config of ``dataset`` under ``profile``; ``overrides`` replace top-level fields."""
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; choose from {PROFILES}")
    if overrides.get("dtype") is not None and overrides["dtype"] not in ("float32", "float64"):
        raise ValueError(f"dtype {overrides['dtype']!r} is not supported: choose float32 or "
                         "float64 (the gold standard's scores are tiny differences of losses)")
    cfg = _paper(dataset)
    table = {"cpu": _CPU, "smoke": _SMOKE}.get(profile, {})
    for part, changes in table.get(dataset, {}).items():
        new = _methods(cfg.methods, changes) if part == "methods" \
            else replace(getattr(cfg, part), **changes)
        cfg = replace(cfg, **{part: new})
    model = {"cpu": _CPU_MODEL, "smoke": _SMOKE_MODEL}.get(profile, {})
    cfg = replace(cfg, profile=profile, **model.get(dataset, {}))
    return replace(cfg, **overrides) if overrides else cfg


def _methods(m: MethodConfig, changes: dict) -> MethodConfig:
    """``m`` with a profile's ``changes``: fields of MethodConfig set, ``skip`` added to its
    skips, and each method's entry ({config field: value}) merged into its settings, field by
    field. A key that is neither a field nor a method, or a field the method's config lacks, is
    a ValueError naming it."""
    from .influence.specs import check_settings, method_specs
    own = {f.name for f in dataclasses.fields(MethodConfig)} - {"settings"}
    methods = {s.name for s in method_specs()}
    unknown = sorted(set(changes) - own - methods)
    if unknown:
        raise ValueError(f"unknown method setting(s) {unknown}: neither fields of MethodConfig "
                         f"({', '.join(sorted(own))}) nor methods ({', '.join(methods)})")
    settings = {k: v for k, v in changes.items() if k in methods}
    check_settings(settings)
    fields = {k: v for k, v in changes.items() if k in own}
    if "skip" in fields:
        fields["skip"] = tuple(m.skip) + tuple(fields["skip"])
    merged = {k: dict(v) for k, v in m.settings.items()}
    for name, values in settings.items():
        merged.setdefault(name, {}).update(values)
    return replace(m, settings=merged, **fields)


def _method_settings(m: MethodConfig) -> dict:
    """{(method, field): value} of every method field that ``m`` sets explicitly."""
    return {(name, k): v for name, values in m.settings.items() for k, v in values.items()}


def reductions(cfg: ExperimentConfig) -> list[str]:
    """Human-readable list of the settings in ``cfg`` that differ from the paper profile."""
    paper = _paper(cfg.dataset)
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
    (:func:`fimoda.banner.banner_text`; notebooks show it as a table)."""
    from .banner import banner_text
    return banner_text(cfg)
