"""What each further-training run leaves out: one training instance (leave-one-out, the paper's
gold standard) or a group S of them (group leave-out, the paper's stated next step and the
further-training counterpart of the datamodels' subsets).

Accepted forms of ``left_out`` (:func:`as_left_out`):

- a 1-D integer sequence ``[i_1, ..., i_n']``: n' leave-one-out runs, run k without i_k; the
  indices must be distinct;
- groups: a list of integer sequences ``[[0, 5], [3], ...]`` (sizes may differ), or a 2-D
  integer array (m, k) of m groups of size k: run g without every member of group g. Members of
  one group must be distinct; groups may overlap and may repeat (random subsets can coincide).
  An entry -1 in a group is padding, so the normalised form below (a result's ``loo_indices``)
  is accepted as it is.

The normalised form is an int64 array: (n',) for leave-one-out, or (m, G) for groups, each row a
group's members in ascending order padded with -1 up to the largest group size G. The full run is
the row of -1 (``FULL``). Groups of size 1 stay groups ((m, 1)), so a work directory never mixes
the two, yet they run the same steps as leave-one-out and give the same numbers, bit for bit.
"""
from __future__ import annotations

import numpy as np
import torch

FULL = -1        # the index of "nothing left out" (the full run, and a group's padding)


def _as_int_array(x, what: str) -> np.ndarray:
    a = np.asarray(x.cpu() if torch.is_tensor(x) else x)
    if a.size and not np.issubdtype(a.dtype, np.integer):
        raise ValueError(f"{what} must hold integer training indices, got dtype {a.dtype}")
    return a.astype(np.int64)


def as_left_out(left_out, n: int, name: str = "left_out") -> np.ndarray:
    """``left_out`` (any form of the module docstring) as its normalised int64 array: (n',) for
    leave-one-out, (m, G) padded with -1 for groups. One ValueError, naming the problem, for an
    empty list, an empty group, a repeated index (within a group; anywhere for leave-one-out), an
    index outside [0, n), a group leaving fewer than one instance, or non-integers; ``name``:
    the argument's name in the messages."""
    if torch.is_tensor(left_out) or isinstance(left_out, np.ndarray):
        arr = np.asarray(left_out.cpu() if torch.is_tensor(left_out) else left_out)
        rows = None if arr.ndim <= 1 else list(arr) if arr.ndim == 2 else False
    else:
        items = list(left_out) if left_out is not None else []
        nested = [np.ndim(x) > 0 or isinstance(x, (list, tuple)) for x in items]
        rows = items if items and all(nested) else None if not any(nested) else False
    if rows is False:
        raise ValueError(f"{name} must be a 1-D sequence of indices (leave-one-out) or a list "
                         "of index sequences / a 2-D index array (groups), not a mix or a "
                         "higher-dimensional array")
    if rows is None:                                  # leave-one-out
        loo = _as_int_array(left_out, name)
        if loo.ndim != 1 or len(loo) == 0:
            raise ValueError(f"{name} must be a non-empty 1-D integer array, got {left_out!r}")
        if len(np.unique(loo)) != len(loo) or loo.min() < 0 or loo.max() >= n:
            raise ValueError(f"{name} must be distinct indices in [0, {n}), got "
                             f"{loo.min()}..{loo.max()} with {len(loo) - len(np.unique(loo))} "
                             "repeated (a group of instances left out together: pass a list "
                             "of groups)")
        return loo
    if not rows:
        raise ValueError(f"{name} holds no groups")
    groups = [_as_int_array(g, f"group {k}").reshape(-1) for k, g in enumerate(rows)]
    groups = [g[g != FULL] for g in groups]           # padding of the normalised form
    for k, g in enumerate(groups):
        if len(g) == 0:
            raise ValueError(f"{name}: group {k} is empty")
        if len(np.unique(g)) != len(g):
            raise ValueError(f"{name}: group {k} repeats an index: {g.tolist()}")
        if g.min() < 0 or g.max() >= n:
            raise ValueError(f"{name}: group {k} has an index outside [0, {n}): {g.tolist()}")
        if len(g) >= n:
            raise ValueError(f"{name}: group {k} leaves out all {n} training instances")
    G = max(len(g) for g in groups)
    out = np.full((len(groups), G), FULL, dtype=np.int64)
    for k, g in enumerate(groups):
        out[k, :len(g)] = np.sort(g)
    return out


def is_groups(left: np.ndarray) -> bool:
    """Whether a normalised ``left_out`` (or a :class:`GoldResult`'s ``loo_indices``) holds
    groups ((m, G)) rather than leave-one-out indices ((n',))."""
    return np.ndim(left) == 2


def group_list(left: np.ndarray) -> list:
    """The groups of a normalised (m, G) array as a list of index arrays (padding dropped)."""
    if not is_groups(left):
        return [np.asarray([i]) for i in np.asarray(left)]
    return [row[row != FULL] for row in np.asarray(left)]


def group_sizes(left) -> np.ndarray:
    """|S_r| of every run in a normalised array of runs (1-D: 1 per index, 0 for ``FULL``;
    2-D: the non-padding members of each row), as an int64 array."""
    left = np.asarray(left)
    if left.ndim == 1:
        return (left != FULL).astype(np.int64)
    return (left != FULL).sum(1).astype(np.int64)
