"""The entry point: :class:`Dataset`, how a dataset is loaded (:class:`Loader`) and
:func:`load_dataset`.

:data:`LOADERS` gives each registered name its :class:`Loader` (task, raw files, builder and
finishing step); it is filled by :func:`fimoda.data.specs.register_dataset` from each dataset's
spec. :func:`load_dataset` gets and verifies the files, reuses the cached arrays when their key
matches (else builds and caches them), finishes them and returns a :class:`Dataset`.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import pandas as pd

from .. import io as fio
from .cache import CACHE_FORMAT, cache_paths, decode_parts, encode_parts, read_cache, write_cache
from .files import ensure_files, env_dir, verify_file
from .files import data_dir as default_data_dir
from .sst2 import tokenizer_key


@dataclass
class Dataset:
    """A preprocessed train/test split. Tabular X float64 (N, d); regression y float64,
    classification y int64; images X float32 (N, C, 32, 32); text X int64 (N, 2, 128) stacking
    input ids and attention mask. ``ids_*`` are row numbers in the original file(s)."""
    name: str
    task: str
    n_classes: int
    X_train: np.ndarray
    y_train: np.ndarray
    X_test: np.ndarray
    y_test: np.ndarray
    ids_train: np.ndarray
    ids_test: np.ndarray
    feature_names: list
    raw_train: Optional[pd.DataFrame]
    raw_test: Optional[pd.DataFrame]
    stand_in_for: Optional[str]
    files: dict
    extra: dict = field(default_factory=dict)

    def __repr__(self) -> str:
        s = (f"Dataset({self.name!r}, {self.task}, n_classes={self.n_classes}, "
             f"train {tuple(self.X_train.shape)}, test {tuple(self.X_test.shape)}")
        if self.stand_in_for:
            s += f", stand-in for {self.stand_in_for}"
        return s + ")"


@dataclass(frozen=True)
class Loader:
    """How one dataset's raw files become a :class:`Dataset` (the loading half of its
    :class:`fimoda.data.specs.DatasetSpec`)."""
    # "regression" (one real target, MSE) or "classification" (integer labels, cross-entropy)
    task: str
    # number of classes (classification) or of targets (regression: 1)
    n_classes: int
    # the raw files it needs, as paths relative to the data directory (each a key of
    # fimoda.data.SOURCES, verified against its sha256)
    files: tuple
    # build(paths, root, **kwargs) -> dict of Dataset's array fields (X_train, y_train, X_test,
    # y_test, ids_train, ids_test, feature_names, raw_train, raw_test, extra); its result is cached
    build: Callable
    # finish(parts) -> parts, applied after the cache on every load (None: none)
    finish: Optional[Callable] = None
    # the dataset of the paper it replaces where the original cannot be had (None: it is one)
    stand_in_for: Optional[str] = None
    # files used when present and not required (relative paths, as ``files``)
    optional: tuple = ()
    # names of the keyword arguments load_dataset accepts for it (others are an error)
    kwargs: tuple = ()


# name -> Loader of every registered dataset (fimoda.data.specs.register_dataset fills it)
LOADERS: dict[str, Loader] = {}
# the old name of LOADERS, public in fimoda.data
DATASETS = LOADERS


def load_dataset(name: str, data_dir=None, cache_dir=None, download: Optional[bool] = None,
                 **kw) -> Dataset:
    """Load dataset ``name`` preprocessed as in the paper (see :mod:`fimoda.data`).

    ``data_dir`` / ``cache_dir`` default to :func:`data_dir` / :func:`cache_dir`. A missing file
    is downloaded atomically from its public source when ``download`` is True, or when it is
    None and the source host answers within 3 s; otherwise one :class:`DataFileError` names the
    file, the expected path and where to get it. Every file is verified against its known-good
    checksum (:class:`ChecksumError`). Keyword arguments: ``sst2``: ``encoder`` (default
    ``fimoda.settings.DEFAULT_ENCODER``), ``limit`` (first ``limit`` train and dev rows; not
    cached)."""
    if name not in LOADERS:
        raise ValueError(f"unknown dataset {name!r}; choose from {', '.join(LOADERS)}")
    spec = LOADERS[name]
    bad = set(kw) - set(spec.kwargs)
    if bad:
        raise ValueError(f"{name}: unknown keyword argument(s) {sorted(bad)}; "
                         f"accepted: {list(spec.kwargs) or 'none'}")
    if name == "sst2":
        from ..settings import DEFAULT_ENCODER
        kw["encoder"] = kw.get("encoder") or DEFAULT_ENCODER
        if kw.get("limit") is not None and (int(kw["limit"]) != kw["limit"] or kw["limit"] < 1):
            raise ValueError(f"sst2: limit must be a positive integer, got {kw['limit']!r}")
    root = Path(data_dir) if data_dir is not None else default_data_dir()
    cache = Path(cache_dir) if cache_dir is not None else env_dir(
        "FIMODA_CACHE_DIR", fio.REPO_ROOT / "data" / "cache")

    paths = ensure_files(spec.files, root, download, spec.optional)
    shas = {rel: fio.sha256_file(p) for rel, p in paths.items()}
    use_cache = kw.get("limit") is None
    key = dict(format=CACHE_FORMAT, name=name,
               kwargs={k: v for k, v in sorted(kw.items()) if v is not None}, sources=shas)
    if name == "sst2":
        key["tokenizer"] = tokenizer_key(kw["encoder"])
    npz, js = cache_paths(cache, name, kw)

    hit = read_cache(npz, js, key) if use_cache else None
    if hit is not None:
        parts = decode_parts(*hit)
    else:
        for rel, p in paths.items():
            verify_file(p, rel)
        parts = spec.build(paths, root, **kw)
        if use_cache:
            arrays, meta = encode_parts(parts)
            try:
                write_cache(npz, js, key, arrays, meta)
            except OSError as e:
                warnings.warn(f"{name}: cache not written to {cache} ({e}); continuing without")
            parts = decode_parts(arrays, meta)     # identical object layout for hits and misses
    if spec.finish is not None:
        parts = spec.finish(parts)
    return Dataset(name=name, task=spec.task, n_classes=spec.n_classes,
                   stand_in_for=spec.stand_in_for, files=shas, **parts)
