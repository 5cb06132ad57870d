"""Data given as a ``torch.utils.data.Dataset`` or ``DataLoader``: its rows, in order, as the
tensors or dict batches the rest of fimoda takes (:func:`rows`).

Row i of a Dataset is ``dataset[i]``; a DataLoader's rows are the rows of its batches, in the
order it yields them (``drop_last=True`` drops its last, short batch). ``left_out`` indices name
these rows, so their order must not be a random draw: a loader that shuffles (``shuffle=True``,
a ``RandomSampler`` drawing every row once) is read through a sequential copy of itself (same
dataset, batch size, collate function, ``drop_last`` and workers), so that row i is
``dataset[i]`` whatever its shuffle. Any other sampler (a subset, weights, draws with
replacement, a ``batch_sampler`` of its own), a loader without batching (``batch_size=None``)
and an ``IterableDataset`` (rows without indices) are refused with one error.

An item of a Dataset (one row) or a batch of a DataLoader may be

- a pair ``(x, y)``: inputs and targets (the ``y`` argument must then be None);
- a dict or ``BatchEncoding`` of token-level tensors, Hugging Face style, with the targets under
  ``labels`` (or ``label``) or given as ``y``: these go on as a list of dict batches, padded and
  packed by :mod:`fimoda.hf` (a Dataset's rows may each have their own length);
- the inputs alone (a tensor or array, or a 1-tuple of one): the targets are then the ``y``
  argument.
"""
from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from torch.utils.data import (DataLoader, Dataset, IterableDataset, RandomSampler,
                              SequentialSampler)
from torch.utils.data import default_collate


def is_torch_data(a) -> bool:
    """Whether ``a`` is a ``torch.utils.data.Dataset`` or ``DataLoader``."""
    return isinstance(a, (Dataset, DataLoader))


def _kind(item, where: str) -> str:
    """``pair``, ``dict`` or ``x`` for one item or batch; a ValueError naming ``where`` for
    anything else."""
    if isinstance(item, Mapping):
        return "dict"
    if isinstance(item, (tuple, list)):
        if len(item) != 2:
            raise ValueError(f"{where} is a tuple of {len(item)} values; give (x, y) pairs, "
                             "dicts of tensors, or inputs alone")
        return "pair"
    if torch.is_tensor(item) or isinstance(item, (np.ndarray, np.generic, int, float)):
        return "x"
    raise ValueError(f"{where} is a {type(item).__name__}; give (x, y) pairs, dicts of tensors, "
                     "or inputs alone")


def _tensor(v, key: str, where: str) -> torch.Tensor:
    """A dict value as a tensor; one ValueError for text and other values that are not numbers."""
    if torch.is_tensor(v):
        return v.detach()
    a = np.asarray(v)
    if a.dtype.kind not in "biuf":
        raise ValueError(f"{where} key {key!r} holds text or objects, not numbers (e.g. "
                         f"{a.reshape(-1)[:1].tolist()}): drop it (dataset.remove_columns) or "
                         "tokenize it")
    return torch.as_tensor(a)


def _dict_batch(d: Mapping, where: str, one_row: bool) -> dict:
    """A dict item / batch with its values as tensors; ``one_row``: a Dataset's row, each value
    given a leading batch dimension of 1 (token ids (L,) -> (1, L), a label () -> (1,))."""
    out = {k: _tensor(v, k, where) for k, v in d.items()}
    return {k: v[None] for k, v in out.items()} if one_row else out


def _reader(data: DataLoader, name: str) -> DataLoader:
    """The loader whose batches are ``data``'s rows in a fixed order: ``data`` itself when it
    reads its dataset in order, a sequential copy when it shuffles; else one ValueError."""
    if data.batch_size is None:
        raise ValueError(f"{name} is a DataLoader without batching (batch_size=None): pass its "
                         "dataset, or a loader with a batch size")
    sampler = data.sampler
    if type(sampler) is SequentialSampler:
        return data
    if type(sampler) is RandomSampler and not sampler.replacement and \
            sampler.num_samples == len(data.dataset):
        return DataLoader(data.dataset, batch_size=data.batch_size, shuffle=False,
                          collate_fn=data.collate_fn, drop_last=data.drop_last,
                          num_workers=data.num_workers, worker_init_fn=data.worker_init_fn)
    raise ValueError(f"{name} is a DataLoader with a {type(sampler).__name__} (or its own "
                     "batch_sampler): its rows are not its dataset's in a fixed order, and "
                     "left_out indices name rows; use shuffle=False (or shuffle=True), or a "
                     "Subset of the dataset")


def _items(data, name: str):
    """(items, one_row): a Dataset's rows, one each, or a DataLoader's batches."""
    dataset = data.dataset if isinstance(data, DataLoader) else data
    if isinstance(dataset, IterableDataset):
        raise ValueError(f"{name} is (or reads) an IterableDataset, whose rows have no indices "
                         "for left_out to name: give a map-style Dataset (__len__ and __getitem__)")
    if isinstance(data, DataLoader):
        return list(_reader(data, name)), False
    try:
        n = len(data)
    except TypeError:
        raise ValueError(f"{name} is a Dataset without a length: give a map-style Dataset "
                         "(__len__ and __getitem__)") from None
    return [data[i] for i in range(n)], True


def _stack(parts: list, what: str, one_row: bool) -> torch.Tensor:
    """The rows of ``parts`` (a Dataset's rows, or a loader's batches) as one tensor; one
    ValueError when their shapes differ beyond the batch dimension."""
    if one_row:
        try:
            return default_collate(parts)
        except (RuntimeError, TypeError) as e:
            raise ValueError(f"{what} cannot be stacked into one tensor ({e}); rows of "
                             "different lengths go in as dicts with an 'attention_mask'") from None
    parts = [p if torch.is_tensor(p) else torch.as_tensor(np.asarray(p)) for p in parts]
    shapes = {tuple(p.shape[1:]) for p in parts}
    if len(shapes) > 1:
        raise ValueError(f"{what} has batches of row shapes {sorted(shapes)[:3]}: token ids "
                         "padded per batch go in as dict batches with an 'attention_mask' "
                         "(fimoda.hf pads them)")
    return torch.cat(parts)


def rows(data, y, name: str, y_name: str):
    """``(X, y)`` with ``data``, a Dataset or DataLoader, read into its rows: a tensor of inputs
    and a tensor of targets, or a list of dict batches (their ``labels`` inside, or ``y``).
    Anything else is returned as it is. ``name``, ``y_name``: the arguments' names, for the one
    ValueError on data that is not accepted (see the module's docstring)."""
    if is_torch_data(y):
        raise ValueError(f"{y_name} is a {type(y).__name__}: the targets come from {name}'s "
                         f"pairs or labels, or as an array or tensor")
    if not is_torch_data(data):
        return data, y
    items, one_row = _items(data, name)
    # a 1-tuple (what TensorDataset(X) yields) is the inputs alone
    items = [it[0] if isinstance(it, (tuple, list)) and len(it) == 1 else it for it in items]
    if not items:
        raise ValueError(f"{name} holds no rows")
    where = f"{name}'s {'row' if one_row else 'batch'}"
    kinds = {_kind(item, f"{where} {i}") for i, item in enumerate(items)}
    if len(kinds) > 1:
        raise ValueError(f"{name} mixes {' and '.join(sorted(kinds))} rows; give one kind")
    kind = kinds.pop()
    if kind == "dict":
        return [_dict_batch(item, where, one_row) for item in items], y
    if kind == "pair":
        if y is not None:
            raise ValueError(f"{name} yields (x, y) pairs, so {y_name} must be None (the "
                             "targets come from the pairs)")
        return (_stack([x for x, _ in items], name, one_row),
                _stack([t for _, t in items], f"{name}'s targets", one_row))
    if y is None:
        raise ValueError(f"{name} yields inputs alone: give the targets as {y_name}")
    return _stack(items, name, one_row), y


__all__ = ["is_torch_data", "rows"]
