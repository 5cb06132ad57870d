"""The entry point: :class:`Dataset`, the table of datasets and :func:`load_dataset`.

:data:`DATASETS` gives each name its task, raw files, builder and finishing step;
:func:`load_dataset` gets and verifies the files, reuses the cached arrays when their key
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
from .cache import CACHE_FORMAT, _cache_paths, _decode, _encode, _read_cache, _write_cache
from .fico import _build_fico
from .files import FOLKTABLES_DEFS, FOLKTABLES_PUMS, _ensure, _env_dir, verify_file
from .files import data_dir as default_data_dir
from .images import _build_cifar10, _build_fashion_mnist, _finish_images
from .income import _build_adult, _build_folktables
from .regression import _build_concrete, _build_energy
from .sst2 import _build_sst2, _finish_text, _tokenizer_key


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
class _Spec:
    task: str
    n_classes: int
    files: tuple
    build: Callable
    finish: Optional[Callable] = None
    stand_in_for: Optional[str] = None
    optional: tuple = ()
    kwargs: tuple = ()


_FMNIST_FILES = tuple(f"fashion-mnist/{s}-{k}" for s in ("train", "t10k")
                      for k in ("images-idx3-ubyte.gz", "labels-idx1-ubyte.gz"))
DATASETS: dict[str, _Spec] = {
    "concrete": _Spec("regression", 1, ("concrete/Concrete_Data.xls",), _build_concrete),
    "energy": _Spec("regression", 1, ("energy/ENB2012_data.xlsx",), _build_energy),
    "fico": _Spec("classification", 2, ("heloc/heloc_dataset_v1.csv",), _build_fico),
    "folktables": _Spec("classification", 2, (FOLKTABLES_PUMS,), _build_folktables,
                        optional=(FOLKTABLES_DEFS,)),
    "adult": _Spec("classification", 2, ("adult/adult.data", "adult/adult.test"), _build_adult,
                   stand_in_for="folktables"),
    "cifar10": _Spec("classification", 10, ("cifar10/cifar-10-python.tar.gz",), _build_cifar10,
                     finish=_finish_images),
    "fashion_mnist": _Spec("classification", 10, _FMNIST_FILES, _build_fashion_mnist,
                           finish=_finish_images, stand_in_for="cifar10"),
    "sst2": _Spec("classification", 2, ("sst2/train.tsv", "sst2/dev.tsv"), _build_sst2,
                  finish=_finish_text, kwargs=("encoder", "limit")),
}


def load_dataset(name: str, data_dir=None, cache_dir=None, download: Optional[bool] = None,
                 **kw) -> Dataset:
    """Load dataset ``name`` preprocessed as in the paper (see :mod:`fimoda.data`).

    ``data_dir`` / ``cache_dir`` default to :func:`data_dir` / :func:`cache_dir`. A missing file
    is downloaded atomically from its public source when ``download`` is True, or when it is
    None and the source host answers within 3 s; otherwise one :class:`DataFileError` names the
    file, the expected path and where to get it. Every file is verified against its known-good
    checksum (:class:`ChecksumError`). Keyword arguments: ``sst2``: ``encoder`` (default
    ``fimoda.config.DEFAULT_ENCODER``), ``limit`` (first ``limit`` train and dev rows; not
    cached)."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose from {sorted(DATASETS)}")
    spec = DATASETS[name]
    bad = set(kw) - set(spec.kwargs)
    if bad:
        raise ValueError(f"{name}: unknown keyword argument(s) {sorted(bad)}; "
                         f"accepted: {list(spec.kwargs) or 'none'}")
    if name == "sst2":
        from ..config import DEFAULT_ENCODER
        kw["encoder"] = kw.get("encoder") or DEFAULT_ENCODER
        if kw.get("limit") is not None and (int(kw["limit"]) != kw["limit"] or kw["limit"] < 1):
            raise ValueError(f"sst2: limit must be a positive integer, got {kw['limit']!r}")
    root = Path(data_dir) if data_dir is not None else default_data_dir()
    cache = Path(cache_dir) if cache_dir is not None else _env_dir(
        "FIMODA_CACHE_DIR", fio.REPO_ROOT / "data" / "cache")

    paths = _ensure(spec.files, root, download, spec.optional)
    shas = {rel: fio.sha256_file(p) for rel, p in paths.items()}
    use_cache = kw.get("limit") is None
    key = dict(format=CACHE_FORMAT, name=name,
               kwargs={k: v for k, v in sorted(kw.items()) if v is not None}, sources=shas)
    if name == "sst2":
        key["tokenizer"] = _tokenizer_key(kw["encoder"])
    npz, js = _cache_paths(cache, name, kw)

    hit = _read_cache(npz, js, key) if use_cache else None
    if hit is not None:
        parts = _decode(*hit)
    else:
        for rel, p in paths.items():
            verify_file(p, rel)
        parts = spec.build(paths, root, **kw)
        if use_cache:
            arrays, meta = _encode(parts)
            try:
                _write_cache(npz, js, key, arrays, meta)
            except OSError as e:
                warnings.warn(f"{name}: cache not written to {cache} ({e}); continuing without")
            parts = _decode(arrays, meta)     # identical object layout for hits and misses
    if spec.finish is not None:
        parts = spec.finish(parts)
    return Dataset(name=name, task=spec.task, n_classes=spec.n_classes,
                   stand_in_for=spec.stand_in_for, files=shas, **parts)
