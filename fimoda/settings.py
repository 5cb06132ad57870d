"""What a run is made of, as plain data: how the final model theta^f is trained
(:class:`TrainConfig`), how the gold standard further-trains it (:class:`FurtherTrainConfig`),
the approximations' settings (:class:`MethodConfig`) and the whole (:class:`ExperimentConfig`:
dataset, task, model and those three).

These classes hold no values of their own beyond defaults: a dataset's values are in its spec
(:mod:`fimoda.data.specs`), and the paper's profiles (:mod:`fimoda.paper.config`) change them.
Training (:mod:`fimoda.training`), the gold standard and the methods read them.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, replace
from typing import Optional

# The damping grid of the paper (App. D.4), multiples of lambda_G (Energy: x10): the methods' own
from .influence.common import DAMPING_GRID

__all__ = ["YardstickConfig", "DAMPING_GRID", "DEFAULT_ENCODER", "TrainConfig", "FurtherTrainConfig",
           "MethodConfig", "ExperimentConfig", "apply_method_overrides"]

# the pretrained encoder of the text model (Hugging Face name) when a config names none
DEFAULT_ENCODER = "sentence-transformers/all-MiniLM-L6-v2"


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
    """One run's settings: the data, the model and how theta^f, the gold standard and the
    methods are computed. ``profile`` names the settings profile the values came from (a label:
    it names the results' folder, ``results/<profile>/<dataset>/``)."""
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
        """Every field as plain dicts and values (the parts as nested dicts)."""
        return dataclasses.asdict(self)


def apply_method_overrides(m: MethodConfig, changes: dict) -> MethodConfig:
    """``m`` with ``changes`` (a profile's, say): fields of MethodConfig set, ``skip`` added to its
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


@dataclass(frozen=True)
class YardstickConfig:
    """Notebook 08's yardsticks beside the paper's: group leave-out further training
    against the sum of single leave-outs, the linear datamodeling score (LDS) two ways, the
    gold standard's noise ceiling, and LoRA further training. The defaults are the full settings (the ``paper``
    profile); a profile's reductions are set per dataset (:class:`fimoda.data.specs.Overrides`
    ``yardsticks``) and printed by notebook 08. Not part of :class:`ExperimentConfig`: no
    result of notebooks 01-07 depends on it."""
    # |S| of the group leave-out runs (sizes above the left-out set's |L| are dropped)
    group_sizes: tuple = (1, 2, 5, 10, 20, 50)
    # random groups S drawn from L per size (size 1: that many distinct instances, at most |L|)
    groups_per_size: int = 10
    # further-training seeds of the group runs: the first k of the gold standard's seeds (None:
    # all of them), so that each group run has the leave-one-out runs of the same seeds
    group_seeds: Optional[int] = None
    # further-training LDS: M random subsets K_m of L keeping a fraction alpha; each model is
    # further trained from theta^f without L \ K_m, with ``group_seeds`` seeds
    lds_subsets: int = 100
    lds_alpha: float = 0.5
    # re-training LDS (classic, Park et al. 2023): M models re-trained from theta^0 with the final
    # model's recipe, over subsets of L kept with fraction alpha (lds_alpha), everything outside L
    # in every model; ``retrain_epochs`` None: the recipe's epochs
    retrain_subsets: int = 100
    retrain_epochs: Optional[int] = None
    retrain_seeds: int = 1
    # the seed of numpy.random.default_rng drawing the groups and subsets
    draw_seed: int = 0
    # LoRA further training (text datasets, paper Sec. 7): the gold standard again with only
    # rank-r adapters of the encoder's trainable linear layers trained, one gold per rank in
    # ``lora_ranks``, over the first ``lora_seeds`` of the gold's seeds (None: all of them);
    # ``lora_methods``: methods also run on the adapters at theta^f, scored against the LoRA gold
    lora_ranks: tuple = (8,)
    lora_seeds: Optional[int] = None
    lora_methods: tuple = ("grad_dot", "datainf")

    def __post_init__(self):
        def bad(msg):
            raise ValueError(f"YardstickConfig: {msg}")
        sizes = tuple(self.group_sizes)
        if not sizes or any(isinstance(k, bool) or not isinstance(k, int) or k < 1
                            for k in sizes) or len(set(sizes)) != len(sizes):
            bad(f"group_sizes must be distinct integers >= 1, got {self.group_sizes!r}")
        object.__setattr__(self, "group_sizes", tuple(sorted(sizes)))
        for name, least in (("groups_per_size", 2), ("lds_subsets", 3), ("retrain_subsets", 3),
                            ("retrain_seeds", 1), ("group_seeds", 1), ("retrain_epochs", 1),
                            ("draw_seed", 0), ("lora_seeds", 1)):
            v = getattr(self, name)
            if v is None and name in ("group_seeds", "retrain_epochs", "lora_seeds"):
                continue
            if isinstance(v, bool) or not isinstance(v, int) or v < least:
                bad(f"{name} must be an integer >= {least}, got {v!r}")
        ranks = tuple(self.lora_ranks)
        if not ranks or any(isinstance(r, bool) or not isinstance(r, int) or r < 1
                            for r in ranks) or len(set(ranks)) != len(ranks):
            bad(f"lora_ranks must be distinct integers >= 1, got {self.lora_ranks!r}")
        object.__setattr__(self, "lora_ranks", ranks)
        object.__setattr__(self, "lora_methods", tuple(self.lora_methods))
        if not 0 < self.lds_alpha < 1:
            bad(f"lds_alpha (the fraction of L each model keeps) must lie in (0, 1), got "
                f"{self.lds_alpha!r}")
