"""How a further-training run leaves out z_i (or a group S): the leave-out mechanism as a strategy.

Every run of a seed starts from theta^f and draws the same epoch orders ``perm_e``
(:mod:`.schedule`); the full run steps on batches b_k of B consecutive instances of ``perm_e`` with
the batch mean of the loss. A mechanism says what run i does differently, in two parts:

- **its epoch order**: which instances of ``perm_e`` the run's batches are cut from
  (:meth:`Mechanism.kept`, :meth:`Mechanism.order` for the one-model reference loop,
  :meth:`Mechanism.positions` for the vectorised batch plan of all runs at once);
- **its batch loss**: terms on the left-out instances added to the batch mean
  (:meth:`Mechanism.extra_slots` and :meth:`Mechanism.extra_terms` for the vectorised engines,
  which see them as extra index slots with their own loss weights; :meth:`Mechanism.reference_loss`
  for the reference loop).

Two are registered (``MECHANISMS``), with the paper's sources:

- ``remove`` (:class:`Remove`): z_i is dropped from every epoch's order, so the run trains on
  D_{-i} exactly (eqs. 2, 3); the reference code behind the paper's tabular figures (Concrete,
  Energy, FICO, Folktables), and so fimoda's default for the tabular datasets.
- ``subtract`` (:class:`Subtract`): every run sees the full set's batches and subtracts
  (1/n) L(z_i) from each batch's loss (paper §6.1 and App. D.3, after Schioppa et al.); the
  paper's SST-2 code, and fimoda's default for images and text.

A new mechanism is one subclass registered by :func:`register_mechanism`; :func:`mechanism`
returns the registered instance of a name (``GoldConfig.mechanism``).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Callable, ClassVar, Optional

import torch

__all__ = ["Mechanism", "Remove", "Subtract", "mechanism", "mechanism_names",
           "register_mechanism", "unregister_mechanism", "MECHANISMS"]


class Mechanism(ABC):
    """A leave-out mechanism: what a run leaving out a set S (|S| >= 1; one instance z_i for
    leave-one-out) trains on, in the reference loop's form and in the vectorised form of all runs
    of a seed at once. Both forms must give the same steps (the tests compare them).

    Class attributes: ``name`` (the registry key, ``GoldConfig.mechanism``, in file names);
    ``how`` (the banner's phrase for what a run does with z_i); ``source`` (the banner's reason:
    where the paper or its code uses it); ``infinitesimal`` (True when the mechanism is the
    eps = 1 point of the family mean_{z in b_k} L(z) - eps L(z_i)/n that
    :mod:`.infinitesimal` differentiates at eps = 0).
    """
    name: ClassVar[str]
    how: ClassVar[str]
    source: ClassVar[str]
    infinitesimal: ClassVar[bool] = False

    # ------------------------------------------------------------------- the epoch order
    @abstractmethod
    def kept(self, n: int, size):
        """Instances in the epoch order of a run leaving out ``size`` of the n (an int, or an
        int64 tensor of runs' sizes, 0 for the full run; same type back): at most n and not
        increasing with ``size`` (the schedule draws the epochs the largest group needs). The run's
        epoch has ceil(kept / B) batches, the last one smaller; in epoch units a run with fewer
        batches than the full run idles for the missing steps."""

    @abstractmethod
    def order(self, perm: torch.Tensor, left: torch.Tensor) -> torch.Tensor:
        """The reference loop's epoch order of a run leaving out ``left`` (1-D indices) when the
        full run's order is ``perm`` (n,); its batches are consecutive slices of B."""

    @abstractmethod
    def positions(self, q: torch.Tensor, e: torch.Tensor, inv: torch.Tensor, left: torch.Tensor,
                  member: torch.Tensor, n: int) -> torch.Tensor:
        """The vectorised form of :meth:`order`: for slot q (S, R, B) of each run's epoch order
        (position in the run's order; valid while q < :meth:`kept`), its position in ``perm_e``.
        ``e`` (S, R) the epoch of each step and run, ``inv`` (E, n) the inverse permutations
        (``inv[e, j]``: position of instance j in ``perm_e``), ``left`` (R, G) each run's
        left-out instances padded with -1, ``member`` = ``left >= 0``."""

    # ------------------------------------------------------------------- the batch loss
    def extra_slots(self, group: int) -> int:
        """Index slots per run and step beyond the batch, for runs leaving out up to ``group``
        instances: the instances of the extra loss terms (none: 0)."""
        return 0

    def extra_terms(self, left: torch.Tensor, member: torch.Tensor,
                    n: int) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        """The extra loss terms of every run at every step, as (indices (R, G) int64, weights
        (R, G) float64): run r's batch loss is the batch mean plus sum_g w[r, g] L(z_idx[r, g])
        (padding: weight 0). None: no extra terms (then :meth:`extra_slots` is 0)."""
        return None

    def reference_loss(self, batch_mean: torch.Tensor, left_out_losses: Callable[[], torch.Tensor],
                       n: int) -> torch.Tensor:
        """The reference loop's loss of one step of a run leaving out a set: from the batch's
        mean loss and ``left_out_losses()`` (the left-out instances' per-example losses at the
        current parameters, computed only when asked). Must equal the vectorised weights of
        :meth:`extra_terms`."""
        return batch_mean


class Remove(Mechanism):
    """``remove``: run i trains on D_{-i} exactly. Its epoch e order is
    ``order_i = perm_e[perm_e != i]`` (a group S: ``perm_e[~isin(perm_e, S)]``), cut into batches
    of B, and every step is plain SGD/Adam on the batch mean,

        theta_{k+1} = A'(theta_k, (1/|b_k^{-i}|) sum_{z in b_k^{-i}} grad L(z; theta_k)),

    so the instances after z_i's position shift by one and run i has ceil((n - 1)/B) batches per
    epoch (one fewer than the full run's when (n - 1) % B == 0: in epoch units it idles for that
    step). The reference code behind the paper's tabular figures; fimoda's default there."""
    name = "remove"
    how = "z_i dropped from every epoch's batch order"
    source = "the reference code behind the paper's tabular figures"

    def kept(self, n, size):
        return n - size

    def order(self, perm, left):
        return perm[~torch.isin(perm, left)]

    def positions(self, q, e, inv, left, member, n):
        # run r leaves out k_r instances, at positions p_0 < ... < p_{k-1} of perm_e; slot q of
        # its order is position q + #{m : p_m - m <= q} of perm_e (p_m - m instances are kept
        # before p_m)
        p = torch.where(member, inv[e[..., None], left.clamp(min=0)], n)   # (S, R, G)
        p = p.sort(-1).values if p.shape[-1] > 1 else p
        kept_before = torch.where(p < n, p - torch.arange(p.shape[-1]), n)  # ascending
        return q + torch.searchsorted(kept_before, q, right=True)


class Subtract(Mechanism):
    """``subtract`` (paper §6.1, App. D.3): every run sees the full set's batches and run i
    minimises at every step

        mean_{z in b_k} L(z; theta) - (1/n) L(z_i; theta)

    (a group S: ``- (1/n) sum_{i in S} L(z_i)``). Over an epoch of K ~ n/B batches z_i weighs 1/B
    in the batch means (one appearance) and K/n ~ 1/B in the subtracted terms, so the two
    approximately cancel, and every left-out run shares the full run's batch order. The
    vectorised engines carry the subtracted instances in G extra slots with weight -1/n (used
    un-augmented). The paper's App. D.3 text and its SST-2 code; fimoda's default for images and
    text, and the one the infinitesimal gold standard differentiates."""
    name = "subtract"
    how = "z_i's scaled loss term subtracted"
    source = "paper App. D.3 and its SST-2 code"
    infinitesimal = True

    def kept(self, n, size):
        return n + 0 * size          # every run's order is the full set's

    def order(self, perm, left):
        return perm

    def positions(self, q, e, inv, left, member, n):
        return q

    def extra_slots(self, group):
        return group

    def extra_terms(self, left, member, n):
        w = torch.where(member, torch.tensor(-1.0 / n, dtype=torch.float64),
                        torch.tensor(0.0, dtype=torch.float64))
        return left.clamp(min=0), w

    def reference_loss(self, batch_mean, left_out_losses, n):
        return batch_mean - left_out_losses().sum() / n


# ----------------------------------------------------------------------------- the registry
_REGISTRY: dict[str, Mechanism] = {}


def register_mechanism(cls: type) -> type:
    """Register a :class:`Mechanism` subclass under its ``name`` (usable as a class decorator);
    a name already registered is a ValueError. Returns ``cls``.

    The name, not the code, identifies the mechanism in a gold standard's work-directory
    fingerprint and file names (``gold_<optimizer>_<mechanism>``): a changed mechanism needs a
    new name. Worker processes (Dask, job-array shards) look it up too, so the module that
    registers it must be imported there as well."""
    if not (isinstance(cls, type) and issubclass(cls, Mechanism)):
        raise ValueError(f"register_mechanism takes a Mechanism subclass, got {cls!r}")
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise ValueError(f"{cls.__name__} needs a non-empty string class attribute 'name'")
    if name in _REGISTRY:
        raise ValueError(f"a leave-out mechanism named {name!r} is already registered")
    _REGISTRY[name] = cls()
    return cls


def unregister_mechanism(name: str) -> None:
    """Remove a mechanism registered by :func:`register_mechanism`; the built-in ones
    (``MECHANISMS``) stay."""
    if name in MECHANISMS:
        raise ValueError(f"the built-in mechanism {name!r} cannot be unregistered")
    mechanism(name)
    del _REGISTRY[name]


def mechanism_names() -> tuple[str, ...]:
    """The names registered now, built-in first."""
    return tuple(_REGISTRY)


def mechanism(name: str) -> Mechanism:
    """The registered mechanism called ``name``; an unknown name is one ValueError listing the
    registered ones."""
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown mechanism {name!r}; choose from {mechanism_names()}") from None


register_mechanism(Remove)
register_mechanism(Subtract)
MECHANISMS = mechanism_names()      # the built-in mechanisms
