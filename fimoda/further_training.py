"""Further training from theta^f: the gold standard of final-model-only attribution (paper §3).

For a final model theta^f, seeds s = 1..S (the batch order xi_s) and left-out instances i in L,
every seed runs the further-training algorithm A' once on the full set D and once per D_{-i}, all
from theta^f and all with the same batch order, and records the loss g(z_j; theta) of every test
instance after every epoch (or every k steps), including t = 0 (theta^f itself):

    loss_full[s, t, j] = g(z_j; theta_{D,s,t})        loss_loo[s, i, t, j] = g(z_j; theta_{-i,s,t})

The attribution scores (:func:`gold_scores`) are then

    (17)  a[i, t, j] = (1/S) sum_s ( loss_loo[s, i, t, j] - loss_full[s, t, j] )
    (13)  a[i, t, j] = (1/S) sum_s ( loss_loo[s, i, t, j] - (1/n') sum_i' loss_loo[s, i', t, j] )

Batch order (paper App. D.3): a ``torch.Generator`` seeded with s drives the shuffling exactly as a
``DataLoader(sampler=RandomSampler(generator=g))`` does: every epoch ``RandomSampler`` draws
``torch.randperm(n, generator=g)`` and then one more (discarded) ``randperm(n)[:0]`` for the
``num_samples % n`` remainder; batches of B are taken in that order, the last one smaller.
``shuffle="randperm"`` draws one permutation per epoch instead (the convention of
``fimoda.train``, used by :func:`retrain_loo` so that its full run is the final model's training).

Leaving out z_i (``mechanism``):
- ``remove``: z_i is taken out of each epoch's order, ``order_i = perm[perm != i]``, which is then
  cut into batches of B; the batches of run i shift by one instance after i's position. When
  (n - 1) % B == 0 run i has one batch fewer per epoch: in epoch units it idles for that step.
- ``subtract`` (§6.1, App. D.3): every run sees the full set's batches and run i minimises
  ``mean_{z in batch} L(z) - (1/n) L(z_i)`` at every step; the full run subtracts nothing.

How it is computed: all runs of a seed are trained at once on stacked parameters (a leading run
dimension). Each step every run r has its own padded index batch ``idx[r, :]`` with weights
``w[r, :]`` (1/|batch| on real items, 0 on padding, -1/n on the subtracted z_i), so its loss is
``sum_m w[r, m] L(z_idx[r, m]; theta_r)`` (padding slots go through the model with weight 0, so
the model must act on each example independently, as every model in eval mode does). Three
engines compute the per-run gradients:
- ``mlp``: Linear/ReLU stacks (the paper's tabular MLPs) by explicit batched matmuls (``bmm``)
  with a hand-written backward pass, in cache-sized blocks of runs (on a CPU spread over
  ``GoldConfig.workers`` threads, one per core by default);
- ``func``: any ``nn.Module`` (in eval mode: BatchNorm uses its running statistics, dropout is
  off) through ``torch.func.functional_call`` + ``vmap(grad(...))``;
- ``loop``: models ``vmap`` cannot batch (Hugging Face encoders), one run after the other.
SGD, Adam and AdamW are applied by hand to the stacked tensors with exactly the arithmetic of
``torch.optim`` (single-tensor path), per-run gradient-norm clipping with that of
``clip_grad_norm_``. :func:`reference_further_train` is the plain one-model-at-a-time loop
(``nn.Module`` + ``torch.optim``) the tests compare against.

Runs are processed in chunks (the full run once per seed, in the first chunk); with a work
directory each (seed, chunk) is saved atomically as it finishes, so a killed run resumes where it
stopped and ends with the same arrays, bit for bit.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Union

import numpy as np
import torch
import torch.nn as nn
from torch.func import functional_call, grad, vmap
from tqdm import tqdm

from .io import load_json, load_npz, save_json, save_npz
from .models import TEXT_GROUP, input_trimmer, linear_relu_layers, per_example_loss

log = logging.getLogger(__name__)

OPTIMIZERS = ("sgd", "adam", "adamw")
MECHANISMS = ("remove", "subtract")
SHUFFLES = ("sampler", "randperm")
ENGINES = ("auto", "mlp", "func", "loop")
ADJUSTMENTS = ("mean", "full")
ADAM_BETAS = (0.9, 0.999)   # torch.optim.Adam/AdamW defaults
ADAM_EPS = 1e-8
CLIP_EPS = 1e-6             # clip_grad_norm_: coef = max_norm / (total_norm + 1e-6)
AUGMENT_SEED_OFFSET = 1     # augmentation generator seed = s + 1 (as fimoda.train)
MLP_RUN_BLOCK_CPU = 8       # runs per cache-sized block of the mlp engine on a CPU
PLAN_STEPS = 64             # steps whose batch indices are built at once
FORMAT = 1                  # version of the work-directory layout


# ----------------------------------------------------------------------------- config
@dataclass(frozen=True)
class GoldConfig:
    """The further-training algorithm A' and how the gold standard is run.

    ``seeds``: an int S means seeds 1..S (the paper's), or an explicit sequence. ``eval_every``:
    None evaluates after every epoch (t in epochs); k evaluates every k steps (t in steps) and
    then ``max_steps`` (or ``epochs`` x the full set's batches per epoch) is the length of every
    run. ``shuffle``: ``sampler`` (DataLoader + RandomSampler, the paper's) or ``randperm`` (one
    permutation per epoch, ``fimoda.train``'s). ``engine``: ``auto`` picks ``mlp`` for
    Linear/ReLU stacks, else ``func`` (vmap), else ``loop`` (models vmap cannot batch).
    ``run_block``: runs per block inside a chunk (None: 8 for the mlp engine on a CPU, the whole
    chunk otherwise). ``max_runs_per_chunk`` (or, when None, ``memory_budget_mb``) sizes the
    chunks. ``device``: where the runs are trained (``cpu``, ``cuda``, ...).
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
    # threads running the mlp engine's blocks on a CPU (None: one per core of the machine). The
    # blocks cross no barrier, so extra threads only share cores when the machine is busy (e.g.
    # the pipeline running two datasets at once); results do not depend on the count.
    workers: Optional[int] = None

    def __post_init__(self):
        def bad(msg):
            raise ValueError(f"GoldConfig: {msg}")
        if self.optimizer not in OPTIMIZERS:
            bad(f"unknown optimizer {self.optimizer!r}; choose from {OPTIMIZERS}")
        if self.mechanism not in MECHANISMS:
            bad(f"unknown mechanism {self.mechanism!r}; choose from {MECHANISMS}")
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
        """From a :class:`fimoda.config.FurtherTrainConfig` (or an ExperimentConfig, whose
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
        """The final model's algorithm (a :class:`fimoda.config.TrainConfig`) as a further-training
        algorithm, for LOO re-training from scratch: ``remove`` mechanism, one permutation per
        epoch (``shuffle="randperm"``, as ``fimoda.train``); an int ``seeds`` S means
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
                  "workers"):
            d.pop(k)
        return d


# ----------------------------------------------------------------------------- results
@dataclass
class GoldResult:
    """Test losses of every further-training run. t indexes ``eval_points`` (epochs or steps,
    starting with 0 = theta^f); j the test instances; i the left-out instances."""
    loss_full: np.ndarray       # (S, T, J)
    loss_loo: np.ndarray        # (S, n', T, J)
    param_dist: np.ndarray      # (S, T): ||theta_t - theta_start|| of the full runs
    param_dist_loo: np.ndarray  # (S, n', T)
    eval_points: np.ndarray     # (T,)
    eval_unit: str              # "epoch" | "step"
    seeds: np.ndarray           # (S,)
    loo_indices: np.ndarray     # (n',)
    test_indices: np.ndarray    # (J,)
    config: dict
    seconds: float = 0.0


# ----------------------------------------------------------------------------- batch order
def draw_permutation(generator: torch.Generator, n: int, shuffle: str = "sampler") -> torch.Tensor:
    """One epoch's order: ``randperm(n)`` from ``generator``; with ``shuffle="sampler"`` a second
    ``randperm(n)`` is drawn and discarded, as ``RandomSampler.__iter__`` does for its
    ``num_samples % n`` (= 0) remainder."""
    perm = torch.randperm(n, generator=generator)
    if shuffle == "sampler":
        torch.randperm(n, generator=generator)
    return perm


def epoch_permutations(n: int, seed: int, n_epochs: int, shuffle: str = "sampler") -> torch.Tensor:
    """(n_epochs, n) int64: the order of every epoch for seed ``seed`` (CPU generator)."""
    g = torch.Generator().manual_seed(int(seed))
    return torch.stack([draw_permutation(g, n, shuffle) for _ in range(n_epochs)])


@dataclass
class Schedule:
    """When each run steps and when it is evaluated.

    Epoch units (``eval_every`` None): global steps s = 0..epochs*K-1 with K = ceil(n/B); step s
    is batch s % K of epoch s // K for every run; a run with K_r < K batches idles at batch K-1.
    Step units: every run takes ``total`` steps, its step s being batch s % K_r of its epoch
    s // K_r (the next epoch's permutation is drawn when its epoch ends).
    """
    n: int
    batch_size: int
    mechanism: str
    by_epoch: bool
    total: int                 # global steps
    k_full: int                # batches per epoch, full set
    k_loo: int                 # batches per epoch, D_{-i}
    eval_steps: np.ndarray     # global steps after which to evaluate (starts with 0)
    eval_points: np.ndarray    # the same in epochs or steps
    n_epochs: int              # permutations needed

    @property
    def slots(self) -> int:
        return self.batch_size + (self.mechanism == "subtract")


def make_schedule(n: int, cfg: GoldConfig) -> Schedule:
    B = cfg.batch_size
    k_full = math.ceil(n / B)
    k_loo = math.ceil((n - 1) / B) if cfg.mechanism == "remove" else k_full
    if cfg.eval_every is None:
        total = cfg.epochs * k_full
        steps = k_full * np.arange(cfg.epochs + 1)
        return Schedule(n, B, cfg.mechanism, True, total, k_full, k_loo, steps,
                        np.arange(cfg.epochs + 1), cfg.epochs)
    total = cfg.max_steps if cfg.max_steps is not None else cfg.epochs * k_full
    steps = np.unique(np.concatenate([np.arange(0, total + 1, cfg.eval_every), [total]]))
    return Schedule(n, B, cfg.mechanism, False, total, k_full, k_loo, steps, steps.copy(),
                    math.ceil(total / k_loo))


def batch_plan(sched: Schedule, perms: torch.Tensor, inv: torch.Tensor, left: torch.Tensor,
               s0: int, s1: int):
    """Padded index batches of global steps s0..s1-1 for the runs ``left`` (-1 = full run).

    Returns ``idx`` (S, R, M) int64 into the training set, ``w`` (S, R, M) float64 per-slot loss
    weights, ``epoch`` (S, R) int64 and ``active`` (S, R) bool (False: the run idles).

    ``remove``: run r's batch b of epoch e covers positions q = bB..bB+B-1 of its own order,
    i.e. positions q + [q >= p_r] of ``perm_e`` (p_r: where i_r sits in ``perm_e``), valid while
    q < n - 1. ``subtract``: the full batch plus one slot holding i_r with weight -1/n.
    """
    n, B = sched.n, sched.batch_size
    R = len(left)
    s = torch.arange(s0, s1)[:, None]                                    # (S, 1)
    loo = left >= 0
    k_r = torch.where(loo, sched.k_loo, sched.k_full)                    # (R,)
    if sched.by_epoch:
        e, b = (s // sched.k_full).expand(-1, R), (s % sched.k_full).expand(-1, R)
    else:
        e, b = s // k_r, s % k_r
    q = b[..., None] * B + torch.arange(B)                               # (S, R, B)
    if sched.mechanism == "remove":
        valid = q < (n - loo.long())[None, :, None]
        p = torch.where(loo, inv[e, left.clamp(min=0)], n)               # (S, R)
        pos = q + (q >= p[..., None]).long()
    else:
        valid = q < n
        pos = q
    idx = perms[e[..., None], pos.clamp(max=n - 1)]
    cnt = valid.sum(-1)
    w = valid.double() / cnt.clamp(min=1)[..., None].double()
    if sched.mechanism == "subtract":
        extra = left.clamp(min=0).expand(len(s), R)[..., None]
        wx = torch.where(loo, torch.tensor(-1.0 / n, dtype=torch.float64),
                         torch.tensor(0.0, dtype=torch.float64)).expand(len(s), R)[..., None]
        idx, w = torch.cat([idx, extra], -1), torch.cat([w, wx], -1)
    return idx, w, e, cnt > 0


def run_batches(n: int, cfg: GoldConfig, seed: int, leave_out: Optional[int] = None) -> list:
    """The index batches one run takes, in order (idle steps skipped), from the same plan the
    vectorised engine uses; for ``subtract`` the subtracted instance is not listed."""
    sched = make_schedule(n, cfg)
    perms = epoch_permutations(n, seed, sched.n_epochs, cfg.shuffle)
    inv = torch.argsort(perms, dim=1)
    left = torch.tensor([-1 if leave_out is None else int(leave_out)])
    idx, w, _, active = batch_plan(sched, perms, inv, left, 0, sched.total)
    out = []
    for k in range(sched.total):
        if active[k, 0]:
            keep = w[k, 0, :cfg.batch_size] > 0
            out.append(idx[k, 0, :cfg.batch_size][keep])
    return out


# ----------------------------------------------------------------------------- augmentation
class _AugmentStream:
    """The augmented view of every training instance in every epoch, shared by all runs of a seed.

    Definition: one generator seeded with ``seed + AUGMENT_SEED_OFFSET`` augments the full set's
    batches in order, epoch by epoch, ``view_e[perm_e[bB:(b+1)B]] = augment(X[...], generator)``;
    a run of any mechanism uses ``view_e[j]`` for instance j in epoch e, so full and LOO runs see
    identical augmentations. Views are computed lazily in that order (requesting epoch e first
    completes the earlier epochs), so the result does not depend on the order of requests. The
    instance subtracted by the ``subtract`` mechanism is used un-augmented.
    """

    def __init__(self, augment: Callable, X: torch.Tensor, batch_size: int, seed: int, perm_of):
        self.augment, self.X, self.B, self.perm_of = augment, X, batch_size, perm_of
        self.g = torch.Generator(device=X.device).manual_seed(int(seed) + AUGMENT_SEED_OFFSET)
        self.views: dict = {}      # epoch -> (views, inverse permutation, permutation)
        self.epoch, self.done = -1, 0  # epoch being filled, batches of it filled
        self.k = math.ceil(len(X) / batch_size)

    def _advance(self):
        if self.epoch < 0 or self.done == self.k:
            self.epoch, self.done = self.epoch + 1, 0
            perm = self.perm_of(self.epoch).to(self.X.device)
            self.views[self.epoch] = (torch.empty_like(self.X), torch.argsort(perm), perm)
        buf, _, perm = self.views[self.epoch]
        ids = perm[self.done * self.B:(self.done + 1) * self.B]
        buf[ids] = self.augment(self.X[ids], self.g).to(buf.dtype)
        self.done += 1

    def get(self, epoch: int, ids: torch.Tensor) -> torch.Tensor:
        """Views of instances ``ids`` (any shape) in ``epoch``."""
        while self.epoch < epoch:
            self._advance()
        if epoch == self.epoch:
            need = int(self.views[epoch][1][ids].max()) // self.B
            while self.done <= need:
                self._advance()
        return self.views[epoch][0][ids]

    def release_before(self, epoch: int):
        for e in [e for e in self.views if e < epoch and e != self.epoch]:
            del self.views[e]


# ----------------------------------------------------------------------------- optimizers
class _StackedOptimizer:
    """SGD / Adam / AdamW on tensors with a leading run dimension, with exactly the per-element
    arithmetic of ``torch.optim`` (``_single_tensor_sgd`` / ``_single_tensor_adam``):

        SGD:   g <- g + wd theta;  theta <- theta - lr g
        Adam:  g <- g + wd theta (Adam) | theta <- theta (1 - lr wd) (AdamW);
               m <- lerp(m, g, 1 - b1);  v <- b2 v + (1 - b2) g^2;
               theta <- theta - lr/(1 - b1^k) * m / (sqrt(v) / sqrt(1 - b2^k) + eps)

    with k the run's own step count. A run that idles in a step keeps its parameters, moments
    and step count unchanged (``active`` False).
    """

    def __init__(self, cfg: GoldConfig, params: list, groups: list):
        self.kind, self.lr, self.wd = cfg.optimizer, float(cfg.lr), float(cfg.weight_decay)
        R = params[0].shape[0]
        self.count = np.zeros(R, dtype=np.int64)
        self.m = [torch.zeros_like(p) for p in params] if self.kind != "sgd" else []
        self.v = [torch.zeros_like(p) for p in params] if self.kind != "sgd" else []
        self.groups = groups
        self.mg = [[t[sl] for t in self.m] for sl in groups]
        self.vg = [[t[sl] for t in self.v] for sl in groups]

    def _apply(self, params, grads, m, v, k: int):
        lr, wd = self.lr, self.wd
        if self.kind == "sgd":
            for p, g in zip(params, grads):
                if wd != 0:
                    g = g.add(p, alpha=wd)
                p.add_(g, alpha=-lr)
            return
        b1, b2 = ADAM_BETAS
        step = float(k)
        bias_correction1 = 1 - b1 ** step
        bias_correction2 = 1 - b2 ** step
        step_size = lr / bias_correction1
        bias_correction2_sqrt = bias_correction2 ** 0.5
        for p, g, ma, va in zip(params, grads, m, v):
            if wd != 0:
                if self.kind == "adamw":
                    p.mul_(1 - lr * wd)
                else:
                    g = g.add(p, alpha=wd)
            ma.lerp_(g, 1 - b1)
            va.mul_(b2).addcmul_(g, g, value=1 - b2)
            denom = (va.sqrt() / bias_correction2_sqrt).add_(ADAM_EPS)
            p.addcdiv_(ma, denom, value=-step_size)

    def update(self, gi: int, params: list, grads: list, active: np.ndarray):
        sl = self.groups[gi]
        m, v = self.mg[gi], self.vg[gi]
        counts = self.count[sl]
        if active.all() and (self.kind == "sgd" or (counts == counts[0]).all()):
            self._apply(params, grads, m, v, int(counts[0]) + 1)   # the common case
            self.count[sl] += 1
            return
        new = counts + active                       # some runs idle, or step counts differ
        ks = np.unique(new[active])[:1 if self.kind == "sgd" else None]
        tensors = list(params) + list(m) + list(v)
        saved = [t.clone() for t in tensors]
        result = [t.clone() for t in tensors]
        for k in ks:
            rows = active & (new == k) if self.kind != "sgd" else active
            rows = torch.as_tensor(rows, device=params[0].device)
            for t, s in zip(tensors, saved):
                t.copy_(s)
            self._apply(params, grads, m, v, int(k))
            for r, t in zip(result, tensors):
                r[rows] = t[rows]
        for t, r in zip(tensors, result):
            t.copy_(r)
        self.count[sl] = new


def _clip_per_run_(grads: list, max_norm: float):
    """Per run: g <- g * min(1, max_norm / (||g|| + 1e-6)), ||g|| over all tensors (the norm of
    the per-tensor norms, as ``torch.nn.utils.clip_grad_norm_``)."""
    G = grads[0].shape[0]
    norms = torch.stack([torch.linalg.vector_norm(g.reshape(G, -1), dim=1) for g in grads], 1)
    total = torch.linalg.vector_norm(norms, dim=1)
    coef = torch.clamp(float(max_norm) / (total + CLIP_EPS), max=1.0)
    for g in grads:
        g.mul_(coef.view(G, *([1] * (g.dim() - 1))))


def _torch_optimizer(cfg: GoldConfig, params):
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    cls = torch.optim.Adam if cfg.optimizer == "adam" else torch.optim.AdamW
    return cls(params, lr=cfg.lr, betas=ADAM_BETAS, eps=ADAM_EPS, weight_decay=cfg.weight_decay)


# ----------------------------------------------------------------------------- engines
def _relu_backward_(grad: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """grad * [out > 0] in place (the kernel of ReLU's backward; half the time of the
    out-of-place op, which allocates)."""
    return torch.ops.aten.threshold_backward.grad_input(grad, out, 0, grad_input=grad)


class _MLPEngine:
    """Linear/ReLU stacks by batched matmuls. Weights are kept transposed, W^T: (R, in, out);
    biases (R, 1, out). Forward h_l = relu(h_{l-1} W_l^T + b_l); backward by hand:
    dW_l^T = h_{l-1}^T d_l, db_l = sum_m d_l, d_{l-1} = (d_l W_l) * [h_{l-1} > 0]."""

    name = "mlp"

    def __init__(self, layers, task: str):
        self.task = task
        self.loss_fn = per_example_loss(task)
        self.start = []        # unstacked start parameters, internal layout
        self.bias = []
        for lin in layers:
            self.start.append(lin.weight.detach().t().contiguous())
            self.bias.append(lin.bias is not None)
            if lin.bias is not None:
                self.start.append(lin.bias.detach().reshape(1, -1).clone())
        self.n_out = layers[-1].out_features

    def supports(self) -> bool:
        return (self.task == "regression" and self.n_out == 1) or \
               (self.task == "classification" and self.n_out >= 2)

    def stack(self, R: int) -> list:
        return [p.unsqueeze(0).repeat(R, *([1] * p.dim())) for p in self.start]

    def _forward(self, P, x):
        hs, k, h = [x], 0, x
        L = len(self.bias)
        for li, has_b in enumerate(self.bias):
            W = P[k]
            if x.dim() == 2 and li == 0:       # shared input (J, d): broadcast over runs
                z = torch.matmul(h, W)
                if has_b:
                    z = z.add_(P[k + 1])
            else:
                z = torch.baddbmm(P[k + 1], h, W) if has_b else torch.bmm(h, W)
            k += 1 + has_b
            if li < L - 1:
                h = z.clamp_min_(0)
                hs.append(h)
            else:
                return z, hs

    def grads(self, P, x, y, w):
        out, hs = self._forward(P, x)
        w = w.unsqueeze(-1)
        if self.task == "regression":
            d = w * (2 * (out - y.unsqueeze(-1)))
        else:
            p = torch.softmax(out, dim=-1)
            p.scatter_add_(-1, y.unsqueeze(-1), torch.full_like(w, -1.0))
            d = w * p
        grads = [None] * len(P)
        ks = np.cumsum([0] + [1 + b for b in self.bias])[:-1]
        for li in reversed(range(len(self.bias))):
            k, h = ks[li], hs[li]
            grads[k] = torch.bmm(h.transpose(1, 2), d)
            if self.bias[li]:
                grads[k + 1] = d.sum(1, keepdim=True)
            if li > 0:
                W = P[k]
                dh = d * W.transpose(1, 2) if d.shape[-1] == 1 else torch.bmm(d, W.transpose(1, 2))
                d = _relu_backward_(dh, h)
        return grads

    def test_losses(self, P, Xt, yt):
        out, _ = self._forward(P, Xt)
        G, J = out.shape[:2]
        return self.loss_fn(out.reshape(G * J, -1), yt.repeat(G)).reshape(G, J)


def _used_parameters(model: nn.Module, task: str, X, Y) -> list[str]:
    """Names of the trainable parameters the loss depends on (tried on two examples). The others
    (e.g. an encoder's unused pooler) get no gradient, and ``torch.optim`` skips them entirely
    (no weight decay either), so they are held fixed here too."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = [p for n, p in model.named_parameters() if p.requires_grad]
    with torch.enable_grad():
        loss = per_example_loss(task)(model(input_trimmer(model)(X[:2])), Y[:2]).sum()
        grads = torch.autograd.grad(loss, params, allow_unused=True)
    return [n for n, g in zip(names, grads) if g is not None]


class _FuncEngine:
    """Any ``nn.Module`` via ``torch.func``: per-run gradients of
    sum_m w[m] L(z_m; theta_r) by ``vmap(grad(functional_call))`` over stacked parameters; the
    buffers (BatchNorm running statistics), frozen and unused parameters are shared."""

    name = "func"

    def __init__(self, model: nn.Module, task: str, used: list, eval_batch: int = 256):
        self.model, self.task, self.eval_batch = model, task, eval_batch
        self.loss_fn = per_example_loss(task)
        self.trim = input_trimmer(model)
        self.names = list(used)
        self.start = [p.detach().clone() for n, p in model.named_parameters() if n in used]
        fixed = {n: p.detach() for n, p in model.named_parameters() if n not in used}
        fixed.update({n: b.detach() for n, b in model.named_buffers()})
        self.fixed = fixed
        loss_fn, names = self.loss_fn, self.names

        def run_loss(plist, x, y, w):
            out = functional_call(model, {**dict(zip(names, plist)), **fixed}, (x,))
            return (w * loss_fn(out, y)).sum()

        def run_test(plist, x, y):
            out = functional_call(model, {**dict(zip(names, plist)), **fixed}, (x,))
            return loss_fn(out, y)

        self._grads = vmap(grad(run_loss))
        self._test = vmap(run_test, in_dims=(0, None, None))

    def supports(self) -> bool:
        return True

    def stack(self, R: int) -> list:
        return [p.unsqueeze(0).repeat(R, *([1] * p.dim())) for p in self.start]

    def column_groups(self, x):
        """Batch positions (dim 1 of the runs' batches ``x``, (R, B, ...)) in groups of similar
        length for a padded-text model (:func:`fimoda.models.row_groups` on each position's
        longest row over the runs), None for any other model: a run's gradient is a sum over its
        rows, so summing it group by group, each group trimmed to its own longest row, is the same
        gradient at a fraction of the padded tokens."""
        lengths = getattr(self.model, "input_lengths", None)
        if lengths is None or x.shape[1] <= TEXT_GROUP:
            return None
        longest = lengths(x.flatten(0, 1)).view(x.shape[0], x.shape[1]).amax(0)
        order = torch.argsort(longest.cpu(), stable=True).to(x.device)
        return [order[s:s + TEXT_GROUP] for s in range(0, len(order), TEXT_GROUP)]

    def grads(self, P, x, y, w):
        groups = self.column_groups(x)
        if groups is None:
            return list(self._grads(tuple(P), self.trim(x), y, w))
        total = None
        for g in groups:
            part = self._grads(tuple(P), self.trim(x[:, g]), y[:, g], w[:, g])
            total = list(part) if total is None else [t.add_(q) for t, q in zip(total, part)]
        return total

    def test_losses(self, P, Xt, yt):
        outs = [self._test(tuple(P), self.trim(Xt[a:a + self.eval_batch]),
                           yt[a:a + self.eval_batch])
                for a in range(0, len(Xt), self.eval_batch)]
        return torch.cat(outs, 1)


class _LoopEngine(_FuncEngine):
    """Any ``nn.Module``, one run after the other: ``functional_call`` + ``torch.autograd.grad``
    per run on the stacked parameters. For models ``vmap`` cannot batch (data-dependent control
    flow, e.g. the attention-mask handling of Hugging Face encoders); the optimizer, batch plan
    and bookkeeping stay vectorised."""

    name = "loop"

    def grads(self, P, x, y, w):
        groups = self.column_groups(x) or [slice(None)]
        out = [torch.empty_like(p) for p in P]
        with torch.enable_grad():
            for r in range(P[0].shape[0]):
                pr = [p[r].detach().requires_grad_() for p in P]
                params = {**dict(zip(self.names, pr)), **self.fixed}
                loss = sum((w[r, g] * self.loss_fn(functional_call(self.model, params,
                                                                   (self.trim(x[r, g]),)),
                                                   y[r, g])).sum() for g in groups)
                for o, g in zip(out, torch.autograd.grad(loss, pr)):
                    o[r] = g
        return out

    def test_losses(self, P, Xt, yt):
        rows = []
        for r in range(P[0].shape[0]):
            params = {**dict(zip(self.names, [p[r] for p in P])), **self.fixed}
            rows.append(torch.cat([
                self.loss_fn(functional_call(self.model, params,
                                             (self.trim(Xt[a:a + self.eval_batch]),)),
                             yt[a:a + self.eval_batch])
                for a in range(0, len(Xt), self.eval_batch)]))
        return torch.stack(rows)


def _vmappable(engine: _FuncEngine, X, Y) -> bool:
    """Whether ``vmap`` can batch the model's gradient (tried on two examples)."""
    P = engine.stack(1)
    x, y = X[:2].unsqueeze(0), Y[:2].unsqueeze(0)
    w = torch.full((1, len(x[0])), 0.5, dtype=P[0].dtype, device=X.device)
    try:
        engine.grads(P, x, y, w)
    except RuntimeError as err:
        if "vmap" in str(err):
            return False
        raise
    return True


def _make_engine(model: nn.Module, task: str, cfg: GoldConfig, X, Y):
    """``mlp`` for Linear/ReLU stacks, else ``func`` (vmap), else ``loop`` (auto). On a CPU a
    convolutional model gets ``loop`` (auto): vmap turns each run's convolution into one grouped
    convolution, which the CPU kernels run slower than the runs one after the other
    (benchmarks/gold_speed_large.py)."""
    if cfg.engine in ("auto", "mlp"):
        layers = linear_relu_layers(model)
        eng = _MLPEngine(layers, task) if layers is not None else None
        if eng is not None and eng.supports():
            return eng
        if cfg.engine == "mlp":
            raise ValueError("engine='mlp' needs a Linear/ReLU stack (fimoda.models.MLP or an "
                             "nn.Sequential of Linear, ReLU, ..., Linear) with one output for "
                             "regression or >= 2 logits for classification; use engine='func'")
    used = _used_parameters(model, task, X, Y)
    if not used:
        raise ValueError("the loss does not depend on any trainable parameter of the model")
    convolutional = any(isinstance(m, nn.modules.conv._ConvNd) for m in model.modules())
    if cfg.engine == "loop" or (cfg.engine == "auto" and convolutional
                                and X.device.type == "cpu"):
        return _LoopEngine(model, task, used)
    eng = _FuncEngine(model, task, used)
    if _vmappable(eng, X, Y):
        return eng
    if cfg.engine == "func":
        raise ValueError("torch.func.vmap cannot batch this model's gradient (data-dependent "
                         "control flow); use engine='loop' or 'auto'")
    log.info("vmap cannot batch this model; using the per-run loop engine")
    return _LoopEngine(model, task, used)


def _activation_elems(model: nn.Module, x1: torch.Tensor) -> int:
    """Elements of all leaf-module outputs for one example (a memory estimate)."""
    total = [0]

    def hook(_m, _i, out):
        if torch.is_tensor(out):
            total[0] += out.numel()

    hs = [m.register_forward_hook(hook) for m in model.modules() if not list(m.children())]
    try:
        with torch.no_grad():
            model(input_trimmer(model)(x1))
    finally:
        for h in hs:
            h.remove()
    return max(total[0], 1)


def _cores() -> int:
    """The CPU cores this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _chunk_runs(cfg: GoldConfig, model, X, n_runs: int, slots: int) -> int:
    if cfg.max_runs_per_chunk is not None:
        return min(cfg.max_runs_per_chunk, n_runs)
    p = next(model.parameters())
    item = p.element_size()
    n_par = sum(q.numel() for q in model.parameters() if q.requires_grad)
    states = 0 if cfg.optimizer == "sgd" else 2
    act = _activation_elems(model, X[:1])
    per_run = item * (n_par * (4 + states) + 4 * slots * act)
    return int(max(1, min(n_runs, (cfg.memory_budget_mb * 2 ** 20) // per_run)))


# ----------------------------------------------------------------------------- one chunk
class _GroupRunner:
    """Runs a function over the blocks of runs: inline, or (mlp engine on a CPU) on a pool of
    ``workers`` threads, each with one intra-op thread and a contiguous share of the blocks.
    The blocks are independent, so the results do not depend on the number of workers; unlike
    OpenMP-parallel ops, no barrier is crossed per op (robust on a loaded machine)."""

    def __init__(self, n_groups: int, workers: int):
        self.pool = None
        self.n = n_groups
        if workers > 1 and n_groups > 1:
            from concurrent.futures import ThreadPoolExecutor
            workers = min(workers, n_groups)
            self.pool = ThreadPoolExecutor(workers, initializer=torch.set_num_threads,
                                           initargs=(1,))
            bounds = np.linspace(0, n_groups, workers + 1).round().astype(int)
            self.shares = [range(bounds[k], bounds[k + 1]) for k in range(workers)]

    @staticmethod
    def _each(fn, share):
        with torch.no_grad():
            for gi in share:
                fn(gi)

    def __call__(self, fn):
        if self.pool is None:
            for gi in range(self.n):
                fn(gi)
            return
        for f in [self.pool.submit(self._each, fn, share) for share in self.shares]:
            f.result()

    def close(self):
        if self.pool is not None:
            self.pool.shutdown()


@torch.no_grad()
def _train_chunk(engine, cfg: GoldConfig, sched: Schedule, perms, inv, left: torch.Tensor,
                 X, Y, Xt, Yt, stream, block: int, workers: int = 1, bar=None):
    """Train the runs ``left`` (-1 = full run) of one seed from the engine's start parameters;
    returns (test losses (R, T, J), parameter distances (R, T)) as float64 CPU tensors."""
    dev = X.device
    R = len(left)
    P = engine.stack(R)
    dtype = P[0].dtype
    start = [p.to(dev) for p in engine.start]
    groups = [slice(a, min(R, a + block)) for a in range(0, R, block)]
    Pg = [[p[sl] for p in P] for sl in groups]
    opt = _StackedOptimizer(cfg, P, groups)
    T, J = len(sched.eval_steps), len(Xt)
    losses = torch.empty(R, T, J, dtype=torch.float64, device=dev)
    dist = torch.empty(R, T, dtype=torch.float64, device=dev)
    subtract = sched.mechanism == "subtract"
    run = _GroupRunner(len(groups), workers if stream is None else 1)

    def evaluate(t, gi):
        sl, Pl = groups[gi], Pg[gi]
        losses[sl, t] = engine.test_losses(Pl, Xt, Yt).double()
        sq = sum(((p - p0).double() ** 2).reshape(p.shape[0], -1).sum(1)
                 for p, p0 in zip(Pl, start))
        dist[sl, t] = sq.sqrt()

    def train(c1, c0, idx, idx_d, w_d, ep, active, gi):
        sl = groups[gi]
        for k in range(c1 - c0):
            ii = idx_d[k, sl]
            if stream is None:
                x = X[ii]
            else:
                x = _stream_gather(stream, ep[k, sl], ii)
                if subtract:
                    x[:, -1] = X[ii[:, -1]]
            g = engine.grads(Pg[gi], x, Y[ii], w_d[k, sl])
            if cfg.grad_clip is not None:
                _clip_per_run_(g, cfg.grad_clip)
            opt.update(gi, Pg[gi], g, active[k, sl.start:sl.stop])

    try:
        run(lambda gi: evaluate(0, gi))
        for t in range(1, T):
            for c0 in range(int(sched.eval_steps[t - 1]), int(sched.eval_steps[t]), PLAN_STEPS):
                c1 = min(c0 + PLAN_STEPS, int(sched.eval_steps[t]))
                idx, w, ep, active = batch_plan(sched, perms, inv, left, c0, c1)
                active = active.numpy()
                if stream is not None:
                    stream.release_before(int(ep.min()))
                idx_d, w_d = idx.to(dev), w.to(dev, dtype)
                run(lambda gi: train(c1, c0, idx, idx_d, w_d, ep, active, gi))
                if bar is not None:
                    bar.update(R * (c1 - c0) / sched.total)
            run(lambda gi: evaluate(t, gi))
    finally:
        run.close()
    return losses.cpu(), dist.cpu()


def _stream_gather(stream: _AugmentStream, epochs: torch.Tensor, idx: torch.Tensor):
    """Augmented views for rows of ``idx`` (G, M), row r in epoch ``epochs[r]``."""
    es = epochs.unique()
    if len(es) == 1:
        return stream.get(int(es[0]), idx)
    out = None
    for e in es.tolist():
        rows = (epochs == e).nonzero().reshape(-1).to(idx.device)
        v = stream.get(e, idx[rows])
        if out is None:
            out = v.new_empty((idx.shape[0],) + tuple(v.shape[1:]))
        out[rows] = v
    return out


# ----------------------------------------------------------------------------- inputs
def _prepare(model, task, X_train, y_train, X_test, y_test, loo_indices, cfg: GoldConfig):
    if task not in ("regression", "classification"):
        raise ValueError(f"unknown task {task!r}; choose 'regression' or 'classification'")
    if not isinstance(cfg, GoldConfig):
        raise ValueError(f"cfg must be a GoldConfig, got {type(cfg).__name__}")
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError("the model has no trainable parameters")
    dev = torch.device(cfg.device)
    model = copy.deepcopy(model).to(dev).eval()
    dtype = next(p for p in model.parameters() if p.is_floating_point()).dtype

    def as_x(a):
        t = torch.as_tensor(np.asarray(a)) if not torch.is_tensor(a) else a.detach()
        return (t.to(dtype) if t.is_floating_point() else t).to(dev)

    def as_y(a):
        t = torch.as_tensor(np.asarray(a)) if not torch.is_tensor(a) else a.detach()
        return (t.to(dtype) if task == "regression" else t.long()).to(dev)

    X, Y, Xt, Yt = as_x(X_train), as_y(y_train), as_x(X_test), as_y(y_test)
    if len(X) != len(Y) or len(X) < 2:
        raise ValueError(f"X_train and y_train need equal lengths >= 2, got {len(X)}, {len(Y)}")
    if len(Xt) != len(Yt) or len(Xt) < 1:
        raise ValueError(f"X_test and y_test need equal lengths >= 1, got {len(Xt)}, {len(Yt)}")
    loo = np.asarray(loo_indices.cpu() if torch.is_tensor(loo_indices) else loo_indices)
    if loo.ndim != 1 or len(loo) == 0 or not np.issubdtype(loo.dtype, np.integer):
        raise ValueError(f"loo_indices must be a non-empty 1-D integer array, got {loo!r}")
    if len(np.unique(loo)) != len(loo) or loo.min() < 0 or loo.max() >= len(X):
        raise ValueError(f"loo_indices must be distinct indices in [0, {len(X)})")
    return model, X, Y, Xt, Yt, loo.astype(np.int64)


def _test_indices(test_indices, J: int) -> np.ndarray:
    if test_indices is None:
        return np.arange(J)
    t = np.asarray(test_indices.cpu() if torch.is_tensor(test_indices) else test_indices)
    if t.shape != (J,):
        raise ValueError(f"test_indices must have one entry per test instance ({J}), "
                         f"got shape {t.shape}")
    return t


def _sha(*tensors) -> str:
    h = hashlib.sha256()
    for t in tensors:
        a = t.detach().cpu().contiguous().numpy() if torch.is_tensor(t) else np.asarray(t)
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def _fingerprint(model, task, X, Y, Xt, Yt, loo, cfg, engine, chunk, block, augment) -> dict:
    return {"format": FORMAT, "config": cfg.numeric(), "engine": engine.name,
            "chunk_runs": chunk, "run_block": block, "device": torch.device(cfg.device).type,
            "task": task, "model": type(model).__name__,
            "theta": _sha(*[v for _, v in sorted(model.state_dict().items())]),
            "train": _sha(X, Y), "test": _sha(Xt, Yt), "loo": loo.tolist(),
            "augment": None if augment is None else getattr(augment, "__qualname__", repr(augment))}


def _open_workdir(workdir, fp: dict) -> Path:
    wd = Path(workdir)
    meta = wd / "config.json"
    h = hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()
    if meta.exists():
        old = load_json(meta)
        if old.get("hash") != h:
            def flat(d, pre=""):
                out = {}
                for k, v in d.items():
                    out.update(flat(v, f"{pre}{k}.") if isinstance(v, dict) else {pre + k: v})
                return out
            ofp, nfp = flat(old.get("fingerprint", {})), flat(json.loads(json.dumps(fp)))
            diff = sorted(k for k in set(ofp) | set(nfp) if ofp.get(k) != nfp.get(k))
            raise ValueError(f"work directory {wd} holds further-training results of a different "
                             f"configuration (differs in: {', '.join(diff) or 'hash'}); use "
                             "another workdir or delete this one")
    else:
        wd.mkdir(parents=True, exist_ok=True)
        save_json(meta, {"hash": h, "fingerprint": fp})
    return wd


# ----------------------------------------------------------------------------- main entry
def further_train(model: nn.Module, task: str, X_train, y_train, X_test, y_test, loo_indices,
                  cfg: GoldConfig, workdir=None, augment: Optional[Callable] = None,
                  test_indices=None, callback: Optional[Callable] = None) -> GoldResult:
    """LOO further training from theta^f (eqs. 2, 3): for every seed, the full run and one run
    per left-out index, all from ``model``'s parameters with the seed's batch order; test losses
    and ||theta_t - theta^f|| at every evaluation point. Vectorised over runs (module docstring).

    ``augment(x_batch, generator)``: optional augmentation of training batches (images), see
    :class:`_AugmentStream`. ``workdir``: resumable storage of finished (seed, chunk) results.
    ``callback(seed, chunk)``: called after each chunk is stored. ``test_indices`` is recorded
    in the result only (default 0..J-1).
    """
    t_start = time.perf_counter()
    model, X, Y, Xt, Yt, loo = _prepare(model, task, X_train, y_train, X_test, y_test,
                                        loo_indices, cfg)
    n, J, n_loo = len(X), len(Xt), len(loo)
    test_idx = _test_indices(test_indices, J)
    sched = make_schedule(n, cfg)
    engine = _make_engine(model, task, cfg, X, Y)
    runs = np.concatenate([[-1], loo])
    chunk = _chunk_runs(cfg, model, X, len(runs), sched.slots)
    if cfg.run_block is not None:
        block = cfg.run_block
    elif engine.name == "mlp" and X.device.type == "cpu":
        block = MLP_RUN_BLOCK_CPU
    else:
        block = chunk
    # CPU mlp engine: blocks on worker threads (one intra-op thread each), one per core
    workers = 1
    if engine.name == "mlp" and X.device.type == "cpu":
        workers = cfg.workers or _cores()
    seeds = cfg.seed_list
    wd = None
    if workdir is not None:
        wd = _open_workdir(workdir, _fingerprint(model, task, X, Y, Xt, Yt, loo, cfg, engine,
                                                 chunk, block, augment))
    T = len(sched.eval_steps)
    loss_full = np.empty((len(seeds), T, J))
    loss_loo = np.empty((len(seeds), n_loo, T, J))
    dist_full = np.empty((len(seeds), T))
    dist_loo = np.empty((len(seeds), n_loo, T))
    n_chunks = math.ceil(len(runs) / chunk)
    threads = torch.get_num_threads()   # worker threads set their own; restored at the end
    bar = tqdm(total=len(seeds) * len(runs), unit="run", disable=not cfg.progress,
               desc=f"further training ({cfg.optimizer}, {cfg.mechanism})",
               bar_format="{l_bar}{bar}| {n:.1f}/{total} runs [{elapsed}<{remaining}, "
                          "{rate_fmt}{postfix}]")
    computed_runs, computed_s = 0, 0.0
    try:
        for si, seed in enumerate(seeds):
            perms = inv = stream = None
            for c in range(n_chunks):
                a, b = c * chunk, min(len(runs), (c + 1) * chunk)
                path = None if wd is None else wd / f"seed{seed}_chunk{c:04d}.npz"
                if path is not None and path.exists():
                    z = load_npz(path)
                    if not (np.array_equal(z["left"], runs[a:b])
                            and z["loss"].shape == (b - a, T, J)):
                        raise ValueError(f"{path} does not match this configuration; delete "
                                         "the work directory")
                    L, D = z["loss"], z["dist"]
                    bar.update(b - a)
                else:
                    if perms is None:
                        perms = epoch_permutations(n, seed, sched.n_epochs, cfg.shuffle)
                        inv = torch.argsort(perms, dim=1)
                    if augment is not None:   # every chunk replays the seed's views
                        stream = _AugmentStream(augment, X, cfg.batch_size, seed,
                                                lambda e, p=perms: p[e])
                    t0 = time.perf_counter()
                    done0 = bar.n
                    Lt, Dt = _train_chunk(engine, cfg, sched, perms, inv,
                                          torch.as_tensor(runs[a:b]), X, Y, Xt, Yt, stream,
                                          block, workers, bar)
                    bar.update(done0 + (b - a) - bar.n)
                    L, D = Lt.numpy(), Dt.numpy()
                    dt = time.perf_counter() - t0
                    computed_runs, computed_s = computed_runs + (b - a), computed_s + dt
                    rate = (b - a) / dt
                    bar.set_postfix_str(f"last chunk {rate:.2f} runs/s")
                    log.info("seed %d chunk %d/%d: %d runs x %d steps in %.2f s (%.2f runs/s, "
                             "%.0f model-steps/s, engine %s)", seed, c + 1, n_chunks, b - a,
                             sched.total, dt, rate, rate * sched.total, engine.name)
                    if path is not None:
                        save_npz(path, loss=L, dist=D, left=runs[a:b])
                    stream = None
                for r in range(a, b):
                    if runs[r] < 0:
                        loss_full[si], dist_full[si] = L[r - a], D[r - a]
                    else:
                        loss_loo[si, r - 1], dist_loo[si, r - 1] = L[r - a], D[r - a]
                if callback is not None:
                    callback(seed, c)
    finally:
        bar.close()
        torch.set_num_threads(threads)
    total_s = time.perf_counter() - t_start
    if computed_runs:
        log.info("further training done: %d runs computed in %.1f s (%.2f runs/s)",
                 computed_runs, computed_s, computed_runs / computed_s)
    config = dataclasses.asdict(cfg)
    config.update(engine=engine.name, chunk_runs=chunk, run_block=block)
    return GoldResult(loss_full, loss_loo, dist_full, dist_loo, sched.eval_points,
                      "epoch" if sched.by_epoch else "step", np.asarray(seeds), loo, test_idx,
                      config, total_s)


# ----------------------------------------------------------------------------- reference
def reference_further_train(model: nn.Module, task: str, X_train, y_train, X_test, y_test,
                            loo_indices, cfg: GoldConfig, workdir=None,
                            augment: Optional[Callable] = None, test_indices=None) -> GoldResult:
    """The same gold standard as :func:`further_train`, one model at a time: ``nn.Module`` in
    eval mode + ``torch.optim``, each run drawing its own epoch orders from a fresh generator
    seeded with s and cutting ``perm`` (``remove``: ``perm[perm != i]``) into batches of B; for
    ``subtract`` the loss is ``mean(batch losses) - L(z_i) / n``. Slow; for tests. ``workdir``
    is accepted for signature compatibility and not used."""
    t_start = time.perf_counter()
    model, X, Y, Xt, Yt, loo = _prepare(model, task, X_train, y_train, X_test, y_test,
                                        loo_indices, cfg)
    n, J, B = len(X), len(Xt), cfg.batch_size
    test_idx = _test_indices(test_indices, J)
    sched = make_schedule(n, cfg)
    loss_fn = per_example_loss(task)
    seeds = cfg.seed_list
    T = len(sched.eval_steps)
    eval_at = {int(s): t for t, s in enumerate(sched.eval_steps)}
    out_loss = np.empty((len(seeds), len(loo) + 1, T, J))
    out_dist = np.empty((len(seeds), len(loo) + 1, T))
    for si, seed in enumerate(seeds):
        for r, i in enumerate([None] + loo.tolist()):
            m = copy.deepcopy(model).eval()
            trim = input_trimmer(m)
            params = [p for p in m.parameters() if p.requires_grad]
            start = [p.detach().clone() for p in params]
            opt = _torch_optimizer(cfg, params)
            g = torch.Generator().manual_seed(int(seed))
            drawn = []
            stream = None if augment is None else _AugmentStream(
                augment, X, B, seed, lambda e: drawn[e])

            def record(t):
                with torch.no_grad():
                    out_loss[si, r, t] = loss_fn(m(trim(Xt)), Yt).double().cpu().numpy()
                    out_dist[si, r, t] = float(torch.sqrt(sum(
                        ((p.detach() - p0).double() ** 2).sum() for p, p0 in zip(params, start))))

            record(0)
            step, epoch = 0, 0
            while True:
                perm = draw_permutation(g, n, cfg.shuffle)
                drawn.append(perm)
                order = perm[perm != i] if (cfg.mechanism == "remove" and i is not None) else perm
                for batch in order.split(B):
                    batch = batch.to(X.device)
                    xb = X[batch] if stream is None else stream.get(epoch, batch)
                    loss = loss_fn(m(trim(xb)), Y[batch]).mean()
                    if cfg.mechanism == "subtract" and i is not None:
                        loss = loss - loss_fn(m(trim(X[i:i + 1])), Y[i:i + 1]).sum() / n
                    opt.zero_grad()
                    loss.backward()
                    if cfg.grad_clip is not None:
                        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                    opt.step()
                    step += 1
                    if not sched.by_epoch:
                        if step in eval_at:
                            record(eval_at[step])
                        if step == sched.total:
                            break
                epoch += 1
                if stream is not None:
                    stream.release_before(epoch)
                if sched.by_epoch:
                    record(epoch)
                    if epoch == cfg.epochs:
                        break
                elif step == sched.total:
                    break
    return GoldResult(out_loss[:, 0], out_loss[:, 1:], out_dist[:, 0], out_dist[:, 1:],
                      sched.eval_points, "epoch" if sched.by_epoch else "step",
                      np.asarray(seeds), loo, test_idx,
                      dict(dataclasses.asdict(cfg), engine="reference"),
                      time.perf_counter() - t_start)


# ----------------------------------------------------------------------------- scores
def gold_scores(loss_full, loss_loo, adjust: str = "mean", seeds=None) -> np.ndarray:
    """Gold attribution scores a[i, t, j] from further-training losses (float64).

    ``adjust="full"``, eq. (17): a = mean_s (loss_loo[s, i] - loss_full[s]).
    ``adjust="mean"``, eq. (13): a = mean_s (loss_loo[s, i] - mean_i' loss_loo[s, i']), which
    equals (17) minus its mean over the left-out set (``loss_full`` may then be None).
    ``seeds``: positions along the seed axis to average over (default all).
    """
    if adjust not in ADJUSTMENTS:
        raise ValueError(f"unknown adjust {adjust!r}; choose from {ADJUSTMENTS}")
    loo = np.asarray(loss_loo, dtype=np.float64)
    if loo.ndim != 4:
        raise ValueError(f"loss_loo must be (S, n', T, J), got shape {loo.shape}")
    sel = slice(None) if seeds is None else np.asarray(seeds)
    loo = loo[sel]
    if loo.shape[0] == 0:
        raise ValueError("no seeds selected")
    if adjust == "mean":
        return (loo - loo.mean(axis=1, keepdims=True)).mean(axis=0)
    full = np.asarray(loss_full, dtype=np.float64)
    if full.ndim != 3 or full.shape[0] != np.asarray(loss_loo).shape[0] \
            or full.shape[1:] != loo.shape[2:]:
        raise ValueError(f"loss_full must be (S, T, J) matching loss_loo {np.shape(loss_loo)}, "
                         f"got {full.shape}")
    return (loo - full[sel][:, None]).mean(axis=0)


def seed_group_scores(loss_full, loss_loo, k: int, adjust: str = "mean") -> np.ndarray:
    """Gold scores from S // k disjoint groups of k consecutive seeds (App. E.1, number-of-seeds
    study): (groups, n', T, J); group g averages seeds g k .. g k + k - 1."""
    S = np.shape(loss_loo)[0]
    if not (isinstance(k, (int, np.integer)) and 1 <= k <= S):
        raise ValueError(f"k must be an integer in [1, {S}], got {k!r}")
    return np.stack([gold_scores(loss_full, loss_loo, adjust, seeds=np.arange(g * k, g * k + k))
                     for g in range(S // k)])


# ----------------------------------------------------------------------------- storage
def save_gold(path, result: GoldResult, config=None) -> Path:
    """Write ``result`` as ``gold_<optimizer>_<mechanism>.npz`` in directory ``path`` (or to
    ``path`` itself when it ends in .npz) with a JSON sidecar (same name, .json) holding
    ``config`` (a GoldConfig or dict; a dict's keys are kept at the top level) and the run's
    gold configuration. Arrays: loss_full, loss_loo, loo_indices, test_indices, eval_points,
    param_dist, param_dist_loo, seeds. The npz is written first, both atomically."""
    path = Path(path)
    if path.suffix != ".npz":
        path = path / f"gold_{result.config['optimizer']}_{result.config['mechanism']}.npz"
    meta = dataclasses.asdict(config) if isinstance(config, GoldConfig) else dict(config or {})
    test_idx = np.asarray(meta.get("test_indices", result.test_indices))
    loo_idx = np.asarray(meta.get("loo_indices", result.loo_indices))
    if len(test_idx) != result.loss_full.shape[-1] or len(loo_idx) != result.loss_loo.shape[1]:
        raise ValueError("config's test_indices / loo_indices do not match the result's shapes")
    save_npz(path, loss_full=result.loss_full, loss_loo=result.loss_loo, loo_indices=loo_idx,
             test_indices=test_idx, eval_points=result.eval_points, param_dist=result.param_dist,
             param_dist_loo=result.param_dist_loo, seeds=result.seeds)
    meta.setdefault("gold_config", result.config)
    meta.setdefault("eval_unit", result.eval_unit)
    meta.setdefault("seeds", result.seeds)
    meta.setdefault("seconds", result.seconds)
    meta.setdefault("shapes", {"loss_full": result.loss_full.shape,
                               "loss_loo": result.loss_loo.shape})
    save_json(path.with_suffix(".json"), meta)
    return path


def load_gold(path) -> GoldResult:
    """Read a file written by :func:`save_gold` back into a :class:`GoldResult`."""
    path = Path(path)
    z = load_npz(path)
    meta = load_json(path.with_suffix(".json")) if path.with_suffix(".json").exists() else {}
    return GoldResult(z["loss_full"], z["loss_loo"], z["param_dist"], z["param_dist_loo"],
                      z["eval_points"], meta.get("eval_unit", "epoch"), z["seeds"],
                      z["loo_indices"], z["test_indices"], meta.get("gold_config", {}),
                      float(meta.get("seconds", 0.0)))


# ----------------------------------------------------------------------------- re-training
def retrain_loo(model_init: nn.Module, cfg, X_train, y_train, X_test, y_test, loo_indices,
                seeds=1, device="cpu", workdir=None, max_runs_per_chunk=None, progress=True,
                callback=None, **overrides) -> GoldResult:
    """LOO re-training from scratch (paper Fig. 11): the final model's algorithm (``cfg.train``:
    optimizer, lr, epochs, batch size) from its initialisation theta^0 (``model_init``), on D and
    on every D_{-i} (``remove``), evaluated after every epoch. The same engine as
    :func:`further_train`, started from theta^0 (:meth:`GoldConfig.from_training`). An int
    ``seeds`` S re-trains with seeds ``cfg.train.seed .. + S - 1``; the first full run is then the
    final model's own training. Only the MLP procedure (constant lr, no momentum) is supported.
    """
    if getattr(cfg, "model", "mlp") != "mlp":
        raise ValueError(f"retrain_loo re-runs the MLP training procedure (plain SGD/AdamW, "
                         f"constant lr); model {cfg.model!r} is trained differently")
    gcfg = GoldConfig.from_training(cfg.train, seeds=seeds, device=device,
                                    max_runs_per_chunk=max_runs_per_chunk, progress=progress,
                                    **overrides)
    return further_train(model_init, cfg.task, X_train, y_train, X_test, y_test, loo_indices,
                         gcfg, workdir=workdir, callback=callback)
