"""The gold standard's configuration and result: :class:`GoldConfig` (the further-training
algorithm A' and how it is run) with the choices it accepts, and :class:`GoldResult` (the test
losses of every further-training run)."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional, Union

import numpy as np

from .mechanisms import MECHANISMS, mechanism  # noqa: F401  (MECHANISMS: re-exported here)

OPTIMIZERS = ("sgd", "adam", "adamw")
SHUFFLES = ("sampler", "randperm")
ENGINES = ("auto", "mlp", "func", "loop")


# ----------------------------------------------------------------------------- config
@dataclass(frozen=True)
class GoldConfig:
    """The further-training algorithm A' and how the gold standard is run.

    ``seeds``: an int S means seeds 1..S (the paper's), or an explicit sequence. ``eval_every``:
    None evaluates after every epoch (t in epochs); k evaluates every k steps (t in steps) and
    then ``max_steps`` (or ``epochs`` x the full set's batches per epoch) is the length of every
    run. ``shuffle``: ``sampler`` (DataLoader + RandomSampler, the paper's) or ``randperm`` (one
    permutation per epoch, ``fimoda.training``'s). ``engine``: ``auto`` picks ``mlp`` for
    Linear/ReLU stacks, else ``func`` (vmap), else ``loop`` (models vmap cannot batch).
    ``run_block``: runs per block inside a chunk (None: 8 for the mlp engine on a CPU, the whole
    chunk otherwise). ``mechanism``: how a run leaves out z_i, the name of a registered
    :class:`~fimoda.gold.mechanisms.Mechanism` (``MECHANISMS``: ``remove``, ``subtract``).
    ``max_runs_per_chunk`` (or, when None, ``memory_budget_mb``) sizes the
    chunks. ``device``: where the runs are trained (``cpu``, ``cuda``, ...). ``diverged``: what
    a run whose test losses or parameter distances become non-finite does: ``raise`` (a
    FloatingPointError, nothing saved) or ``keep`` (its values stay non-finite, a warning is
    logged; for callers that leave such runs out, as the re-training LDS does).
    """
    optimizer: str = "sgd"
    lr: float = 3e-2
    epochs: int = 500
    max_steps: Optional[int] = None
    eval_every: Optional[int] = None
    batch_size: int = 128
    weight_decay: float = 0.0
    grad_clip: Optional[float] = None
    mechanism: str = "subtract"
    seeds: Union[int, tuple] = 100
    shuffle: str = "sampler"
    engine: str = "auto"
    run_block: Optional[int] = None
    max_runs_per_chunk: Optional[int] = None
    memory_budget_mb: float = 2048.0
    device: str = "cpu"
    progress: bool = True
    diverged: str = "raise"         # a non-finite run: "raise" | "keep" (left to the caller)
    # threads running the mlp engine's blocks on a CPU (None: one per core of the machine). The
    # blocks cross no barrier, so extra threads only share cores when the machine is busy (e.g.
    # the pipeline running two datasets at once); results do not depend on the count.
    workers: Optional[int] = None

    def __post_init__(self):
        def bad(msg):
            raise ValueError(f"GoldConfig: {msg}")
        if self.optimizer not in OPTIMIZERS:
            bad(f"unknown optimizer {self.optimizer!r}; choose from {OPTIMIZERS}")
        try:
            mechanism(self.mechanism)
        except ValueError as e:
            bad(str(e))
        if self.diverged not in ("raise", "keep"):
            bad(f"diverged must be 'raise' or 'keep', got {self.diverged!r}")
        if self.shuffle not in SHUFFLES:
            bad(f"unknown shuffle {self.shuffle!r}; choose from {SHUFFLES}")
        if self.engine not in ENGINES:
            bad(f"unknown engine {self.engine!r}; choose from {ENGINES}")
        if not (isinstance(self.lr, (int, float)) and self.lr > 0 and math.isfinite(self.lr)):
            bad(f"lr must be a positive number, got {self.lr!r}")
        if self.workers is not None and not (isinstance(self.workers, int) and self.workers >= 1):
            bad(f"workers must be None or a positive int, got {self.workers!r}")
        if not self.weight_decay >= 0:
            bad(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            bad(f"grad_clip must be None or > 0, got {self.grad_clip!r}")
        for name in ("batch_size", "epochs"):
            v = getattr(self, name)
            if not (isinstance(v, (int, np.integer)) and v >= 1):
                bad(f"{name} must be an integer >= 1, got {v!r}")
        for name in ("max_steps", "eval_every", "run_block", "max_runs_per_chunk"):
            v = getattr(self, name)
            if v is not None and not (isinstance(v, (int, np.integer)) and v >= 1):
                bad(f"{name} must be None or an integer >= 1, got {v!r}")
        if self.max_steps is not None and self.eval_every is None:
            bad("max_steps counts steps: give eval_every (steps between evaluations) too")
        if not self.memory_budget_mb > 0:
            bad(f"memory_budget_mb must be > 0, got {self.memory_budget_mb!r}")
        seeds = self.seeds
        if isinstance(seeds, (int, np.integer)) and not isinstance(seeds, bool):
            if seeds < 1:
                bad(f"seeds must be >= 1 (seeds 1..S) or a list, got {seeds}")
            seeds = int(seeds)
        else:
            try:
                seeds = tuple(int(s) for s in seeds)
            except TypeError:
                bad(f"seeds must be an int S or a sequence of ints, got {seeds!r}")
            if not seeds or len(set(seeds)) != len(seeds):
                bad(f"seeds must be non-empty and distinct, got {seeds}")
        object.__setattr__(self, "seeds", seeds)

    @property
    def seed_list(self) -> list[int]:
        return list(range(1, self.seeds + 1)) if isinstance(self.seeds, int) else list(self.seeds)

    @classmethod
    def from_experiment(cls, further, optimizer: Optional[str] = None, **overrides) -> "GoldConfig":
        """From a :class:`fimoda.settings.FurtherTrainConfig` (or an ExperimentConfig, whose
        ``.further`` is used). With ``optimizer="adam"`` the learning rate is ``adam_lr``
        (App. E.1); ``overrides`` replace any field."""
        further = getattr(further, "further", further)
        opt = optimizer or further.optimizer
        kw = dict(optimizer=opt, lr=further.adam_lr if opt == "adam" else further.lr,
                  epochs=further.epochs, max_steps=further.max_steps,
                  eval_every=further.eval_every, batch_size=further.batch_size,
                  weight_decay=further.weight_decay, grad_clip=further.grad_clip,
                  mechanism=further.mechanism, seeds=further.seeds)
        kw.update(overrides)
        return cls(**kw)

    @classmethod
    def from_training(cls, train, seeds=1, **overrides) -> "GoldConfig":
        """The final model's algorithm (a :class:`fimoda.settings.TrainConfig`) as a further-training
        algorithm, for LOO re-training from scratch: ``remove`` mechanism, one permutation per
        epoch (``shuffle="randperm"``, as ``fimoda.training``); an int ``seeds`` S means
        ``train.seed, ..., train.seed + S - 1`` so that the first full run repeats the final
        model's own training."""
        train = getattr(train, "train", train)
        if isinstance(seeds, (int, np.integer)):
            seeds = tuple(range(train.seed, train.seed + int(seeds)))
        kw = dict(optimizer=train.optimizer, lr=train.lr, epochs=train.epochs,
                  batch_size=train.batch_size, weight_decay=train.weight_decay,
                  grad_clip=train.grad_clip, mechanism="remove", shuffle="randperm",
                  seeds=seeds)
        kw.update(overrides)
        return cls(**kw)

    def numeric(self) -> dict:
        """The fields that determine the numbers (not the seeds, which are stored per file)."""
        d = dataclasses.asdict(self)
        for k in ("seeds", "progress", "memory_budget_mb", "max_runs_per_chunk", "device",
                  "workers", "diverged"):
            d.pop(k)
        return d


# ----------------------------------------------------------------------------- results
@dataclass
class GoldResult:
    """Test losses of every further-training run. t indexes ``eval_points`` (epochs or steps,
    starting with 0 = theta^f); j the test instances; i the left-out instances, or for group runs
    the groups (row i of ``loo_indices``: group i's members padded with -1)."""
    loss_full: np.ndarray       # (S, T, J)
    loss_loo: np.ndarray        # (S, n', T, J)
    param_dist: np.ndarray      # (S, T): ||theta_t - theta_start|| of the full runs
    param_dist_loo: np.ndarray  # (S, n', T)
    eval_points: np.ndarray     # (T,)
    eval_unit: str              # "epoch" | "step"
    seeds: np.ndarray           # (S,)
    loo_indices: np.ndarray     # (n',) left-out indices, or (m, G) groups (fimoda.gold.groups)
    test_indices: np.ndarray    # (J,)
    config: dict
    seconds: float = 0.0
