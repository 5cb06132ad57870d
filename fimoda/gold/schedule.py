"""When and on what each further-training run steps: the epoch orders of a seed, the
:class:`Schedule` of steps and evaluations, the padded index batches of all runs at once
(:func:`batch_plan`), and the augmented views shared by the runs of a seed.

Batch order (paper App. D.3): a ``torch.Generator`` seeded with s drives the shuffling exactly as a
``DataLoader(sampler=RandomSampler(generator=g))`` does: every epoch ``RandomSampler`` draws
``torch.randperm(n, generator=g)`` and then one more (discarded) ``randperm(n)[:0]`` for the
``num_samples % n`` remainder; batches of B are taken in that order, the last one smaller.
``shuffle="randperm"`` draws one permutation per epoch instead (the convention of
``fimoda.training``, used by :func:`fimoda.gold.retrain_loo` so that its full run is the final
model's training).

How a run leaves out z_i is its mechanism (``cfg.mechanism``, a
:class:`~fimoda.gold.mechanisms.Mechanism`): which instances of ``perm_e`` its epoch order keeps
(``remove``: all but z_i, so the batches after i's position shift by one; ``subtract``: all) and
which extra loss terms its batch loss carries (``subtract``: -(1/n) L(z_i) at every step). A run
may leave out a group S instead (:mod:`fimoda.gold.groups`); a group of one runs exactly the
steps of leave-one-out.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch

from .config import GoldConfig
from .mechanisms import Mechanism, mechanism

AUGMENT_SEED_OFFSET = 1     # augmentation generator seed = s + 1 (as fimoda.training)


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
    group: int = 1             # the most instances one run leaves out (G)

    @property
    def strategy(self) -> Mechanism:
        """The leave-out mechanism (:func:`fimoda.gold.mechanisms.mechanism` of its name)."""
        return mechanism(self.mechanism)

    @property
    def slots(self) -> int:
        """Index slots per run and step: the batch, plus the mechanism's extra loss terms
        (``subtract``: the G subtracted)."""
        return self.batch_size + self.strategy.extra_slots(self.group)


def make_schedule(n: int, cfg: GoldConfig, group: int = 1) -> Schedule:
    """The schedule of runs on n training instances that leave out at most ``group`` each
    (``k_loo``: batches per epoch of a run leaving out that many)."""
    B = cfg.batch_size
    k_full = math.ceil(n / B)
    k_loo = math.ceil(mechanism(cfg.mechanism).kept(n, group) / B)
    if k_loo > k_full:
        raise ValueError(f"mechanism {cfg.mechanism!r}: a run leaving out {group} instance(s) "
                         f"keeps more than the full set's {n} in its epoch order")
    if cfg.eval_every is None:
        total = cfg.epochs * k_full
        steps = k_full * np.arange(cfg.epochs + 1)
        return Schedule(n, B, cfg.mechanism, True, total, k_full, k_loo, steps,
                        np.arange(cfg.epochs + 1), cfg.epochs, group)
    total = cfg.max_steps if cfg.max_steps is not None else cfg.epochs * k_full
    steps = np.unique(np.concatenate([np.arange(0, total + 1, cfg.eval_every), [total]]))
    return Schedule(n, B, cfg.mechanism, False, total, k_full, k_loo, steps, steps.copy(),
                    math.ceil(total / k_loo), group)


def batch_plan(sched: Schedule, perms: torch.Tensor, inv: torch.Tensor, left: torch.Tensor,
               s0: int, s1: int):
    """Padded index batches of global steps s0..s1-1 for the runs ``left``: (R,) one left-out
    index per run, or (R, G) a group per run padded with -1 (-1 alone: the full run).

    Returns ``idx`` (S, R, M) int64 into the training set, ``w`` (S, R, M) float64 per-slot loss
    weights, ``epoch`` (S, R) int64 and ``active`` (S, R) bool (False: the run idles).

    Run r's epoch order keeps ``kept(n, k_r)`` instances of ``perm_e`` (k_r: its group's
    size); its batch b of epoch e covers positions q = bB..bB+B-1 of that order, valid while
    q < kept, which the mechanism maps to positions of ``perm_e``
    (:meth:`~fimoda.gold.mechanisms.Mechanism.positions`). The mechanism's extra loss terms
    follow in the last slots (``subtract``: the group's members with weight -1/n, padding 0).
    """
    n, B = sched.n, sched.batch_size
    mech = sched.strategy
    left = left.reshape(len(left), -1)                                   # (R, G)
    R = len(left)
    s = torch.arange(s0, s1)[:, None]                                    # (S, 1)
    member = left >= 0                                                   # (R, G)
    size = member.sum(1)                                                 # (R,)
    kept = mech.kept(n, size)                                            # (R,)
    k_r = (kept + B - 1) // B                                            # ceil(kept / B)
    if sched.by_epoch:
        e, b = (s // sched.k_full).expand(-1, R), (s % sched.k_full).expand(-1, R)
    else:
        e, b = s // k_r, s % k_r
    q = b[..., None] * B + torch.arange(B)                               # (S, R, B)
    valid = q < kept[None, :, None]
    pos = mech.positions(q, e, inv, left, member, n)
    idx = perms[e[..., None], pos.clamp(max=n - 1)]
    cnt = valid.sum(-1)
    w = valid.double() / cnt.clamp(min=1)[..., None].double()
    extra = mech.extra_terms(left, member, n)
    if extra is not None:
        ix, wx = (t.expand(len(s), R, -1) for t in extra)
        idx, w = torch.cat([idx, ix], -1), torch.cat([w, wx], -1)
    return idx, w, e, cnt > 0


def run_batches(n: int, cfg: GoldConfig, seed: int, leave_out=None) -> list:
    """The index batches one run takes, in order (idle steps skipped), from the same plan the
    vectorised engine uses. ``leave_out``: None (the full run), an index, or a group (a sequence
    of distinct indices); the instances of a mechanism's extra loss terms (``subtract``: the
    subtracted) are not listed."""
    members = [] if leave_out is None else np.atleast_1d(np.asarray(leave_out, np.int64))
    sched = make_schedule(n, cfg, max(1, len(members)))
    perms = epoch_permutations(n, seed, sched.n_epochs, cfg.shuffle)
    inv = torch.argsort(perms, dim=1)
    left = torch.full((1, max(1, len(members))), -1, dtype=torch.int64)
    left[0, :len(members)] = torch.as_tensor(members, dtype=torch.int64)
    idx, w, _, active = batch_plan(sched, perms, inv, left, 0, sched.total)
    out = []
    for k in range(sched.total):
        if active[k, 0]:
            keep = w[k, 0, :cfg.batch_size] > 0
            out.append(idx[k, 0, :cfg.batch_size][keep])
    return out


# ----------------------------------------------------------------------------- augmentation
class AugmentStream:
    """The augmented view of every training instance in every epoch, shared by all runs of a seed.

    Definition: one generator seeded with ``seed + AUGMENT_SEED_OFFSET`` augments the full set's
    batches in order, epoch by epoch, ``view_e[perm_e[bB:(b+1)B]] = augment(X[...], generator)``;
    a run of any mechanism uses ``view_e[j]`` for instance j in epoch e, so full and LOO runs see
    identical augmentations. Views are computed lazily in that order (requesting epoch e first
    completes the earlier epochs), so the result does not depend on the order of requests. The
    instances of a mechanism's extra loss terms (``subtract``: the subtracted) are used
    un-augmented.
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


def stream_gather(stream: AugmentStream, epochs: torch.Tensor, idx: torch.Tensor):
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
