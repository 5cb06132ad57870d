"""The datasets of the paper (App. D.1): verified raw files -> preprocessed train/test arrays.

Reading in order (1, 2 in :mod:`.files`, 4 in :mod:`.cache`, 3 and 5 below):

1. where the files live (:func:`data_dir`, :func:`cache_dir`) and the table of known-good files
   (:data:`SOURCES`: relative path, sha256, public URL or where to get it);
2. getting a file: verify it (:func:`verify_file`), or download it atomically when it is missing
   and the source host answers (``download=None``: only when online; never in the tests);
3. one builder per dataset that reproduces the paper's preprocessing (split with scikit-learn's
   ``train_test_split(random_state=0)``, standardization fitted on the training split);
4. the cache: the built arrays are written once to ``<cache>/<name>[_<encoder>].npz`` with a JSON
   record of the source sha256s; a later call whose sources have other hashes rebuilds it;
5. :func:`load_dataset`, the one entry point, and :func:`augment_images` (training-time image
   augmentation of the CIFAR-10 recipe).

Datasets (``name``): ``concrete``, ``energy`` (regression), ``fico``, ``folktables``, ``adult``
(binary classification), ``cifar10``, ``fashion_mnist`` (10 classes, images) and ``sst2`` (binary,
text). ``adult`` and ``fashion_mnist`` are offline stand-ins for ``folktables`` and ``cifar10``
(their originals cannot be had here) and say so in ``Dataset.stand_in_for``.
"""
from __future__ import annotations

import csv
import gzip
import os
import pickle
import tarfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from .. import io as fio
from .cache import CACHE_FORMAT, _cache_paths, _decode, _encode, _read_cache, _write_cache
from .files import (FOLKTABLES_DEFS, FOLKTABLES_PUMS, SOURCES, ChecksumError, DataFileError,
                    Source, _ensure, _env_dir, _read_excel, cache_dir, content_fingerprint,
                    data_dir, verify_file)

VAL_SIZE = 1000           # images: fixed validation subset of the test set (paper App. D.1)
VAL_SEED = 0
TEXT_MAX_LENGTH = 128     # SST-2: tokenizer max length (paper App. D.1)


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


# ---------------------------------------------------------------------------------------------
# 3. Builders: raw files -> arrays (the paper's preprocessing)
# ---------------------------------------------------------------------------------------------

def _split(n: int, test_size: float) -> tuple[np.ndarray, np.ndarray]:
    """Row positions of ``train_test_split(range(n), test_size, random_state=0)`` (paper D.1)."""
    from sklearn.model_selection import train_test_split
    tr, te = train_test_split(np.arange(n), test_size=test_size, random_state=0)
    return np.asarray(tr, np.int64), np.asarray(te, np.int64)


def _standardize(train: np.ndarray, test: np.ndarray):
    """z = (x - mean_train) / std_train per column (StandardScaler: population std; a constant
    column keeps scale 1)."""
    from sklearn.preprocessing import StandardScaler
    sc = StandardScaler().fit(train)
    return sc.transform(train), sc.transform(test), sc.mean_, sc.scale_


def _regression(df: pd.DataFrame, features: list, target: str) -> dict:
    """90/10 split (random_state=0), every column incl. the target standardized on train."""
    tr, te = _split(len(df), 0.1)
    cols = list(features) + [target]
    a = df[cols].to_numpy(np.float64)
    ztr, zte, mean, scale = _standardize(a[tr], a[te])
    return dict(
        X_train=ztr[:, :-1], y_train=ztr[:, -1], X_test=zte[:, :-1], y_test=zte[:, -1],
        ids_train=tr, ids_test=te, feature_names=[str(c) for c in features],
        raw_train=df.iloc[tr], raw_test=df.iloc[te],
        extra=dict(x_mean=mean[:-1], x_std=scale[:-1], y_mean=float(mean[-1]),
                   y_std=float(scale[-1]), target=str(target)))


def _build_concrete(paths, root, **kw) -> dict:
    """UCI Concrete: 1030 x (8 features + strength); 927/103."""
    df = _read_excel(paths["concrete/Concrete_Data.xls"])
    df.columns = [str(c).strip() for c in df.columns]
    if df.shape != (1030, 9):
        raise DataFileError(f"concrete/Concrete_Data.xls: expected 1030x9 cells, got {df.shape}")
    return _regression(df, list(df.columns[:8]), df.columns[8])


def _build_energy(paths, root, **kw) -> dict:
    """UCI Energy Efficiency: X1..X8, target Y1 (heating load), Y2 dropped; 691/77."""
    df = _read_excel(paths["energy/ENB2012_data.xlsx"]).dropna(how="all").dropna(axis=1, how="all")
    want = [f"X{i}" for i in range(1, 9)] + ["Y1", "Y2"]
    if list(df.columns) != want or len(df) != 768:
        raise DataFileError(f"energy/ENB2012_data.xlsx: expected 768 rows with columns {want}, "
                            f"got {df.shape} {list(df.columns)}")
    return _regression(df.drop(columns="Y2"), want[:8], "Y1")


FICO_LABEL = "RiskPerformance"


def _fico_features(raw: pd.DataFrame, train_rows: np.ndarray) -> pd.DataFrame:
    """Special values of the FICO HELOC data, as in the reference preprocessing of the paper
    (Wei et al. 2021, ``load_and_process_FICO``), with every statistic from the training split:

    - MSinceMostRecentDelq: -7 (>= 84 months) -> max + 1; -8 (no data) -> mean of values >= 0;
    - MSinceMostRecentInqexcl7days: -7 (inquiry in the last 7 days) -> 0; -8 (> 24 months)
      -> max + 1;
    - MaxDelq2PublicRecLast12M > 7 ("other") -> 7;
    - remaining -8, then remaining -9 -> per-column mean of values >= 0 (each mean computed
      after the previous replacement, in that order)."""
    x = raw.astype(np.float64).copy()
    tr = x.index[train_rows]
    c = "MSinceMostRecentDelq"
    mean_delq = x.loc[tr, c][x.loc[tr, c] >= 0].mean()
    max_delq = x.loc[tr, c].max()
    x.loc[x[c] == -7, c] = max_delq + 1
    x.loc[x[c] == -8, c] = mean_delq
    c = "MSinceMostRecentInqexcl7days"
    x.loc[x[c] == -7, c] = 0
    x.loc[x[c] == -8, c] = x.loc[tr, c].max() + 1
    c = "MaxDelq2PublicRecLast12M"
    x.loc[x[c] > 7, c] = 7
    for special in (-8, -9):
        t = x.loc[tr]
        means = t[t >= 0].mean()
        for col in x.columns:
            x.loc[x[col] == special, col] = means[col]
    return x


def _build_fico(paths, root, **kw) -> dict:
    """FICO HELOC: drop rows whose 23 features are all -9 (10,459 -> 9,871), 90/10 split
    (8,883/988), special values recoded with training statistics (:func:`_fico_features`),
    standardized on train. Label: RiskPerformance, Bad = 0, Good = 1 (LabelEncoder order)."""
    raw = pd.read_csv(paths["heloc/heloc_dataset_v1.csv"])
    if FICO_LABEL not in raw.columns or raw.shape[1] != 24:
        raise DataFileError(f"heloc/heloc_dataset_v1.csv: expected {FICO_LABEL} + 23 feature "
                            f"columns, got {list(raw.columns)}")
    feats = raw.drop(columns=FICO_LABEL)
    keep = (feats > -9).any(axis=1).to_numpy()
    raw, feats = raw[keep], feats[keep]
    y = (raw[FICO_LABEL] == "Good").to_numpy(np.int64)
    tr, te = _split(len(raw), 0.1)
    x = _fico_features(feats, tr).to_numpy(np.float64)
    ztr, zte, mean, scale = _standardize(x[tr], x[te])
    ids = raw.index.to_numpy(np.int64)
    return dict(X_train=ztr, y_train=y[tr], X_test=zte, y_test=y[te],
                ids_train=ids[tr], ids_test=ids[te], feature_names=list(feats.columns),
                raw_train=raw.iloc[tr], raw_test=raw.iloc[te],
                extra=dict(x_mean=mean, x_std=scale, classes=["Bad", "Good"]))


def _dummies(df: pd.DataFrame, numeric: list, categorical: list) -> pd.DataFrame:
    """Numeric columns first, then one 0/1 column per value present of each categorical column
    (pandas ``get_dummies``, all levels kept), float64."""
    d = pd.get_dummies(df[numeric + categorical], columns=categorical, prefix_sep="_",
                       dtype=np.float64)
    return d.astype(np.float64)


def _classification_tabular(x: pd.DataFrame, y: np.ndarray, ids: np.ndarray, numeric: list,
                            raw: pd.DataFrame) -> dict:
    """75/25 split (random_state=0); only the ``numeric`` columns standardized (fit on train)."""
    tr, te = _split(len(x), 0.25)
    a = x.to_numpy(np.float64)
    num = [x.columns.get_loc(c) for c in numeric]
    ztr, zte = a[tr].copy(), a[te].copy()
    ztr[:, num], zte[:, num], mean, scale = _standardize(a[tr][:, num], a[te][:, num])
    return dict(X_train=ztr, y_train=y[tr], X_test=zte, y_test=y[te],
                ids_train=ids[tr], ids_test=ids[te], feature_names=list(x.columns),
                raw_train=raw.iloc[tr], raw_test=raw.iloc[te],
                extra=dict(standardized=list(numeric), x_mean=mean, x_std=scale,
                           classes=["<=50K", ">50K"]))


ACS_NUMERIC = ["AGEP", "WKHP"]
ACS_CATEGORICAL = ["COW", "SCHL", "MAR", "OCCP", "POBP", "RELP", "SEX", "RAC1P"]


def _build_folktables(paths, root, **kw) -> dict:
    """Folktables ACSIncome, Massachusetts 2018 1-Year (paper D.1): folktables' Adult-like filter
    (AGEP > 16, PINCP > 100, WKHP > 0, PWGTP >= 1), label PINCP > 50,000, the 8 categorical
    features dummy-coded on their codes (e.g. ``OCCP_9300``), 75/25 split, AGEP and WKHP
    standardized. The real file gives 40,114 rows x 791 features (target mean 0.46844)."""
    from folktables import ACSDataSource, ACSIncome, generate_categories
    from folktables.acs import adult_filter
    source = ACSDataSource(survey_year="2018", horizon="1-Year", survey="person",
                           root_dir=str(root / "folktables"))
    acs = source.get_data(states=["MA"], download=False)
    need = set(ACSIncome.features) | {"PINCP", "PWGTP"}
    if not need <= set(acs.columns):
        raise DataFileError(f"{FOLKTABLES_PUMS}: columns {sorted(need - set(acs.columns))} "
                            "are missing; is it the ACS PUMS person file?")
    kept = adult_filter(acs)
    feats, label, _ = ACSIncome.df_to_pandas(acs)      # the same filter; NaN -> -1
    feats = feats.astype({c: np.int64 for c in ACS_CATEGORICAL})
    x = _dummies(feats, ACS_NUMERIC, ACS_CATEGORICAL)
    y = label.to_numpy().ravel().astype(np.int64)
    ids = kept.index.to_numpy(np.int64)
    raw = kept[list(ACSIncome.features) + ["PINCP"]].copy()
    if FOLKTABLES_DEFS in paths:         # decode the codes for qualitative tables
        try:
            cats = generate_categories(ACS_CATEGORICAL, source.get_definitions(download=False))
        except Exception as e:
            warnings.warn(f"{FOLKTABLES_DEFS} not usable ({type(e).__name__}: {e}); raw "
                          "tables keep the census codes")
            cats = {}
        for c, m in cats.items():
            raw[c] = raw[c].map(lambda v, m=m: m.get(float(v), v) if pd.notna(v) else v)
    raw["income>50K"] = y
    return _classification_tabular(x, y, ids, ACS_NUMERIC, raw)


ADULT_COLUMNS = ["age", "workclass", "fnlwgt", "education", "education-num", "marital-status",
                 "occupation", "relationship", "race", "sex", "capital-gain", "capital-loss",
                 "hours-per-week", "native-country", "income"]
ADULT_NUMERIC = ["age", "hours-per-week"]
ADULT_CATEGORICAL = ["workclass", "education", "marital-status", "occupation", "relationship",
                     "race", "sex", "native-country"]


def _build_adult(paths, root, **kw) -> dict:
    """UCI Adult, the stand-in for Folktables ACSIncome (whose columns AGEP, COW, SCHL, MAR,
    OCCP, RELP, RAC1P, SEX, WKHP, POBP these 10 map onto): adult.data and adult.test pooled
    (ids: adult.data rows 0..32560, then adult.test rows from 32561), rows with '?' dropped,
    categoricals dummy-coded, age and hours-per-week standardized, label income > 50K,
    75/25 split (random_state=0)."""
    kw_csv = dict(header=None, names=ADULT_COLUMNS, skipinitialspace=True, na_values=["?"],
                  keep_default_na=False)
    a = pd.read_csv(paths["adult/adult.data"], **kw_csv)
    b = pd.read_csv(paths["adult/adult.test"], skiprows=1, **kw_csv)   # "|1x3 Cross validator"
    if len(a) != 32561 or len(b) != 16281:
        raise DataFileError(f"adult: expected 32561 + 16281 rows, got {len(a)} + {len(b)}")
    df = pd.concat([a, b], ignore_index=True)
    df["income"] = df["income"].str.rstrip(".")
    bad = set(df["income"].unique()) - {"<=50K", ">50K"}
    if bad:
        raise DataFileError(f"adult: unexpected income labels {sorted(bad)}")
    df = df.dropna(subset=ADULT_NUMERIC + ADULT_CATEGORICAL)
    y = (df["income"] == ">50K").to_numpy(np.int64)
    x = _dummies(df, ADULT_NUMERIC, ADULT_CATEGORICAL)
    return _classification_tabular(x, y, df.index.to_numpy(np.int64), ADULT_NUMERIC, df)


# Images ------------------------------------------------------------------------------------

FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                   "Sneaker", "Bag", "Ankle boot"]
CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                 "truck"]


def _image_parts(xtr: np.ndarray, ytr, xte: np.ndarray, yte, classes) -> dict:
    """uint8 images (N, C, 32, 32) + per-channel training mean/std of x/255 (exact, from pixel
    histograms) + the validation subset: ``VAL_SIZE`` test positions drawn without replacement
    with ``np.random.default_rng(0)``, sorted."""
    C = xtr.shape[1]
    v = np.arange(256, dtype=np.float64) / 255.0
    mean, std = np.empty(C), np.empty(C)
    for c in range(C):
        h = np.bincount(xtr[:, c].ravel(), minlength=256).astype(np.float64)
        n = h.sum()
        mean[c] = (h * v).sum() / n
        std[c] = np.sqrt((h * (v - mean[c]) ** 2).sum() / n)
    val = np.sort(np.random.default_rng(VAL_SEED).choice(
        len(xte), size=min(VAL_SIZE, len(xte)), replace=False)).astype(np.int64)
    return dict(X_train=xtr, y_train=np.asarray(ytr, np.int64), X_test=xte,
                y_test=np.asarray(yte, np.int64), ids_train=np.arange(len(xtr), dtype=np.int64),
                ids_test=np.arange(len(xte), dtype=np.int64),
                feature_names=["gray"] if C == 1 else ["red", "green", "blue"][:C],
                raw_train=None, raw_test=None,
                extra=dict(mean=mean, std=std, pad_value=-mean / std, val_indices=val,
                           classes=list(classes)))


def _read_idx(path) -> np.ndarray:
    """IDX file (gzip): magic 0x0000 08 <ndim>, big-endian int32 dims, then uint8 data."""
    with gzip.open(path, "rb") as fh:
        buf = fh.read()
    if buf[:2] != b"\x00\x00" or buf[2] != 8:
        raise DataFileError(f"{path}: not a uint8 IDX file")
    nd = buf[3]
    dims = np.frombuffer(buf, ">i4", count=nd, offset=4)
    return np.frombuffer(buf, np.uint8, offset=4 + 4 * nd).reshape(dims)


def _build_fashion_mnist(paths, root, **kw) -> dict:
    """Fashion-MNIST, the stand-in for CIFAR-10: 60,000/10,000 28x28 images zero-padded by 2
    pixels to 32x32, one channel."""
    p = "fashion-mnist/"
    xs = [np.pad(_read_idx(paths[p + f"{s}-images-idx3-ubyte.gz"]), ((0, 0), (2, 2), (2, 2)))
          [:, None] for s in ("train", "t10k")]
    ys = [_read_idx(paths[p + f"{s}-labels-idx1-ubyte.gz"]) for s in ("train", "t10k")]
    return _image_parts(xs[0], ys[0], xs[1], ys[1], FASHION_CLASSES)


class _CifarUnpickler(pickle.Unpickler):
    """Unpickler that only builds what the CIFAR-10 batches contain (dicts, lists, bytes and
    numpy uint8 arrays)."""
    ALLOWED = {(m, n) for m in ("numpy.core.multiarray", "numpy._core.multiarray")
               for n in ("_reconstruct", "scalar")} | {
        ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"CIFAR-10 batch refers to {module}.{name}")
        if module.startswith("numpy.core"):
            module = "numpy._core" + module[len("numpy.core"):]
        return super().find_class(module, name)


def _build_cifar10(paths, root, **kw) -> dict:
    """CIFAR-10 python archive: data_batch_1..5 (50,000) and test_batch (10,000); each pickle
    holds ``data`` (N, 3072 uint8, channel-major 3x32x32) and ``labels``."""
    batches = {}
    with tarfile.open(paths["cifar10/cifar-10-python.tar.gz"]) as t:
        for m in t.getmembers():
            base = m.name.rsplit("/", 1)[-1]
            if m.isfile() and (base.startswith("data_batch_") or base == "test_batch"):
                with t.extractfile(m) as fh:
                    d = _CifarUnpickler(fh, encoding="bytes").load()
                batches[base] = (np.asarray(d[b"data"], np.uint8).reshape(-1, 3, 32, 32),
                                 np.asarray(d[b"labels"], np.int64))
    want = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    if set(want) - set(batches):
        raise DataFileError("cifar10/cifar-10-python.tar.gz lacks "
                            f"{sorted(set(want) - set(batches))}")
    xtr = np.concatenate([batches[w][0] for w in want[:5]])
    ytr = np.concatenate([batches[w][1] for w in want[:5]])
    return _image_parts(xtr, ytr, *batches["test_batch"], CIFAR_CLASSES)


# Text --------------------------------------------------------------------------------------

def _read_sst2(path) -> pd.DataFrame:
    df = pd.read_csv(path, sep="\t", quoting=csv.QUOTE_NONE, keep_default_na=False,
                     dtype={"sentence": str})
    if list(df.columns) != ["sentence", "label"]:
        raise DataFileError(f"{path}: expected columns sentence, label; got {list(df.columns)}")
    return df


def _tokenizer(encoder: str):
    """``transformers.AutoTokenizer`` of ``encoder``, resolved by
    :func:`fimoda.models.resolve_encoder` (the offline all-MiniLM-L6-v2 package for the default);
    ``HF_HUB_OFFLINE=1`` unless set otherwise."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer
    from ..models import resolve_encoder
    return AutoTokenizer.from_pretrained(resolve_encoder(encoder))


def _tokenize(tok, sentences: list, max_length: int, desc: str) -> np.ndarray:
    """(N, 2, L) int32: input ids and attention mask, padded / truncated to ``max_length``."""
    out = np.zeros((len(sentences), 2, max_length), np.int32)
    step = 2048
    for i in tqdm(range(0, len(sentences), step), desc=desc, leave=False,
                  disable=len(sentences) <= step):
        enc = tok(sentences[i:i + step], padding="max_length", truncation=True,
                  max_length=max_length, return_tensors="np")
        out[i:i + step, 0] = enc["input_ids"]
        out[i:i + step, 1] = enc["attention_mask"]
    return out


def _build_sst2(paths, root, encoder=None, limit=None, **kw) -> dict:
    """GLUE SST-2: train.tsv (67,349) for training, the 872 dev sentences as the test set (GLUE's
    test labels are hidden); tokenized with the encoder's tokenizer, max length 128. ``limit``
    keeps the first ``limit`` rows of each (quick runs; not cached)."""
    tr, te = _read_sst2(paths["sst2/train.tsv"]), _read_sst2(paths["sst2/dev.tsv"])
    if limit is not None:
        tr, te = tr.iloc[:limit], te.iloc[:limit]
    tok = _tokenizer(encoder)
    parts = dict(X_train=_tokenize(tok, tr.sentence.tolist(), TEXT_MAX_LENGTH, "tokenize train"),
                 y_train=tr.label.to_numpy(np.int64),
                 X_test=_tokenize(tok, te.sentence.tolist(), TEXT_MAX_LENGTH, "tokenize dev"),
                 y_test=te.label.to_numpy(np.int64),
                 ids_train=tr.index.to_numpy(np.int64), ids_test=te.index.to_numpy(np.int64),
                 feature_names=["input_ids", "attention_mask"], raw_train=tr, raw_test=te,
                 extra=dict(encoder=encoder, max_length=TEXT_MAX_LENGTH,
                            tokenizer=str(getattr(tok, "name_or_path", "")),
                            sentences_train=tr.sentence.tolist(),
                            sentences_test=te.sentence.tolist(), classes=["negative", "positive"]))
    n_trunc = int((parts["X_train"][:, 1, -1] == 1).sum() + (parts["X_test"][:, 1, -1] == 1).sum())
    parts["extra"]["n_truncated"] = n_trunc
    return parts


# Finishing (the same for fresh builds and cache hits) --------------------------------------

def _finish_images(parts: dict) -> dict:
    """x = (u8 / 255 - mean_c) / std_c, float32."""
    mean = np.asarray(parts["extra"]["mean"], np.float32)[:, None, None]
    std = np.asarray(parts["extra"]["std"], np.float32)[:, None, None]
    for k in ("X_train", "X_test"):
        x = parts[k].astype(np.float32)
        x *= np.float32(1 / 255)
        x -= mean
        x /= std
        parts[k] = x
    return parts


def _finish_text(parts: dict) -> dict:
    parts["X_train"] = parts["X_train"].astype(np.int64)
    parts["X_test"] = parts["X_test"].astype(np.int64)
    return parts


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



def _tokenizer_key(encoder: str) -> dict:
    """sha256 of the tokenizer files of ``encoder`` (a changed tokenizer invalidates the cache)."""
    from ..models import resolve_encoder
    p = Path(resolve_encoder(encoder))
    files = ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json")
    return {f: fio.sha256_file(p / f) for f in files if (p / f).is_file()} or {"name": encoder}


# ---------------------------------------------------------------------------------------------
# 5. Entry points
# ---------------------------------------------------------------------------------------------

def load_dataset(name: str, data_dir=None, cache_dir=None, download: Optional[bool] = None,
                 **kw) -> Dataset:
    """Load dataset ``name`` preprocessed as in the paper (see the module docstring).

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
    root = Path(data_dir) if data_dir is not None else _env_dir(
        "FIMODA_DATA_DIR", fio.REPO_ROOT / "data" / "raw")
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


def augment_images(x: torch.Tensor, generator: torch.Generator, padding: int = 4,
                   fill=0.0) -> torch.Tensor:
    """Random crop with zero padding + random horizontal flip, per image of a batch (B, C, H, W):

        out[b] = flip_b( pad_p(x[b])[:, dy_b : dy_b + H, dx_b : dx_b + W] ),
        dy_b, dx_b ~ U{0, ..., 2p},  flip_b ~ Bernoulli(1/2),

    drawn from ``generator`` in the order dy (B), dx (B), flip (B), so that the same generator
    state gives the same batch. ``fill`` is the padding value (a scalar or one per channel; the
    default 0 pads with the mean colour of standardized images, ``Dataset.extra['pad_value']``
    pads with black as the common recipe that pads before standardizing)."""
    if x.ndim != 4:
        raise ValueError(f"augment_images expects (B, C, H, W), got shape {tuple(x.shape)}")
    B, C, H, W = x.shape
    p = int(padding)
    gdev = generator.device
    dy = torch.randint(0, 2 * p + 1, (B,), generator=generator, device=gdev).to(x.device)
    dx = torch.randint(0, 2 * p + 1, (B,), generator=generator, device=gdev).to(x.device)
    flip = torch.randint(0, 2, (B,), generator=generator, device=gdev).to(x.device).bool()
    fill_t = torch.as_tensor(fill, dtype=x.dtype, device=x.device).reshape(-1, 1, 1)
    xp = fill_t.expand(C, H + 2 * p, W + 2 * p).repeat(B, 1, 1, 1)
    xp[:, :, p:p + H, p:p + W] = x
    rows = dy[:, None] + torch.arange(H, device=x.device)                 # (B, H)
    cols = dx[:, None] + torch.arange(W, device=x.device)                 # (B, W)
    cols = torch.where(flip[:, None], cols.flip(1), cols)                 # flip = reversed cols
    out = xp[torch.arange(B, device=x.device)[:, None, None], :, rows[:, :, None], cols[:, None, :]]
    return out.permute(0, 3, 1, 2).contiguous()                          # (B, H, W, C) -> BCHW
