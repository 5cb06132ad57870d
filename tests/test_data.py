"""Tests of the data layer (the fimoda.data package).

Real files are read from ``FIMODA_DATA_DIR`` (else ``<repo>/data/raw``); a test whose file is
absent is skipped with the reason. Folktables and CIFAR-10 cannot be had offline: their loaders
are tested on tiny files in the original formats that the tests write. No test touches the
network: ``_online`` is patched to False for every test, downloads are exercised with file:// URLs.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import pickle
import shutil
import tarfile
import time
import zipfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import fimoda.data as fd
from fimoda import io as fio
from fimoda.settings import DEFAULT_ENCODER
from fimoda.data import dataset as fd_dataset, fico as fd_fico, files as fd_files
from fimoda.data import income as fd_income, sst2 as fd_sst2
from fimoda.data import ChecksumError, DataFileError, augment_images, load_dataset

DATA = fd.data_dir()


def need(*rels):
    missing = [r for r in rels if not (DATA / r).is_file()]
    if missing:
        pytest.skip(f"{', '.join(missing)} not under {DATA} (set FIMODA_DATA_DIR to the data "
                    f"folder, e.g. ../shared/data)")


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """No network in tests: every host counts as unreachable."""
    monkeypatch.setattr(fd_files, "_online", lambda *a, **k: False)


@pytest.fixture
def cache(tmp_path):
    return tmp_path / "cache"


def copy_into(tmp_path, *rels) -> Path:
    root = tmp_path / "raw"
    for r in rels:
        (root / r).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(DATA / r, root / r)
    return root


def assert_standardized(a, cols=None):
    a = a if cols is None else a[:, cols]
    np.testing.assert_allclose(a.mean(0), 0, atol=1e-10)
    np.testing.assert_allclose(a.std(0), 1, atol=1e-10)


def assert_same(d1, d2):
    for k in ("X_train", "y_train", "X_test", "y_test", "ids_train", "ids_test"):
        a, b = getattr(d1, k), getattr(d2, k)
        assert a.dtype == b.dtype and np.array_equal(a, b), k
    assert d1.feature_names == d2.feature_names and d1.files == d2.files
    for k in ("raw_train", "raw_test"):
        a, b = getattr(d1, k), getattr(d2, k)
        assert (a is None and b is None) or (a.shape == b.shape and np.array_equal(
            a.astype(str).to_numpy(), b.astype(str).to_numpy()) and a.index.equals(b.index))


def check_split(d, n_train, n_test, n_total=None):
    assert d.X_train.shape[0] == len(d.y_train) == len(d.ids_train) == n_train
    assert d.X_test.shape[0] == len(d.y_test) == len(d.ids_test) == n_test
    assert not set(d.ids_train) & set(d.ids_test)
    if n_total is not None:
        assert len(set(d.ids_train) | set(d.ids_test)) == n_total
    assert d.ids_train.dtype == np.int64


# ---------------------------------------------------------------------------------------------
# Real files: shapes, splits, standardization, cache round trip
# ---------------------------------------------------------------------------------------------

def test_concrete(cache):
    need("concrete/Concrete_Data.xls")
    d = load_dataset("concrete", cache_dir=cache)
    assert (d.task, d.n_classes, d.stand_in_for) == ("regression", 1, None)
    check_split(d, 927, 103, 1030)
    assert d.X_train.shape[1] == 8 and d.X_train.dtype == d.y_train.dtype == np.float64
    assert_standardized(d.X_train)
    assert_standardized(d.y_train[:, None])
    assert abs(d.X_test.mean()) > 1e-3          # the test split is not re-centred
    # the target is the standardized strength column of the original rows
    raw = d.raw_train.iloc[:, -1].to_numpy()
    np.testing.assert_allclose(d.y_train * d.extra["y_std"] + d.extra["y_mean"], raw, rtol=1e-12)
    assert d.raw_train.index.tolist() == d.ids_train.tolist()
    assert abs(pd.concat([d.raw_train, d.raw_test]).iloc[:, -1].mean() - 35.8178) < 1e-4
    # second call is served from the cache, bit for bit
    assert (cache / "concrete.npz").is_file() and (cache / "concrete.json").is_file()
    assert_same(d, load_dataset("concrete", cache_dir=cache))


def test_energy(cache):
    need("energy/ENB2012_data.xlsx")
    d = load_dataset("energy", cache_dir=cache)
    check_split(d, 691, 77, 768)
    assert d.feature_names == [f"X{i}" for i in range(1, 9)] and d.extra["target"] == "Y1"
    assert_standardized(d.X_train)
    assert_standardized(d.y_train[:, None])
    np.testing.assert_allclose(d.y_test * d.extra["y_std"] + d.extra["y_mean"],
                               d.raw_test["Y1"].to_numpy(), rtol=1e-12)


def test_fico(cache):
    need("heloc/heloc_dataset_v1.csv")
    d = load_dataset("fico", cache_dir=cache)
    check_split(d, 8883, 988, 9871)
    assert d.X_train.shape[1] == len(d.feature_names) == 23 and d.n_classes == 2
    assert d.y_train.dtype == np.int64 and set(np.unique(d.y_train)) == {0, 1}
    assert_standardized(d.X_train)
    y = np.concatenate([d.y_train, d.y_test])
    assert abs(y.mean() - 0.479688) < 1e-6               # Good share after the row filter
    assert np.array_equal(d.y_train, (d.raw_train["RiskPerformance"] == "Good").to_numpy())
    # every special value (-7, -8, -9) is recoded: the unstandardized features are all >= 0
    x = np.concatenate([d.X_train, d.X_test]) * d.extra["x_std"] + d.extra["x_mean"]
    assert x.min() > -1e-9
    assert (d.raw_train.drop(columns="RiskPerformance").to_numpy() < 0).any()   # raw kept as is


def reference_fico(feats: pd.DataFrame) -> pd.DataFrame:
    """The reference recoding (statistics over all rows), written independently with
    DataFrame.replace(value, Series) as the reference does."""
    x = feats.astype(float).copy()
    c = "MSinceMostRecentDelq"
    m = x.loc[x[c] >= 0, c].mean()
    x.loc[x[c] == -7, c] = x[c].max() + 1
    x.loc[x[c] == -8, c] = m
    c = "MSinceMostRecentInqexcl7days"
    x.loc[x[c] == -7, c] = 0
    x.loc[x[c] == -8, c] = x[c].max() + 1
    x.loc[x["MaxDelq2PublicRecLast12M"] > 7, "MaxDelq2PublicRecLast12M"] = 7
    x = x.replace(-8, x[x >= 0].mean())
    return x.replace(-9, x[x >= 0].mean())


def test_fico_recoding_matches_reference():
    need("heloc/heloc_dataset_v1.csv")
    raw = pd.read_csv(DATA / "heloc/heloc_dataset_v1.csv").drop(columns="RiskPerformance")
    raw = raw[(raw > -9).any(axis=1)]
    ours = fd_fico._fico_features(raw, np.arange(len(raw)))      # "training split" = all rows
    pd.testing.assert_frame_equal(ours, reference_fico(raw), check_exact=False, rtol=1e-12)


def test_adult(cache):
    need("adult/adult.data", "adult/adult.test")
    d = load_dataset("adult", cache_dir=cache)
    assert d.stand_in_for == "folktables"
    check_split(d, 33916, 11306, 45222)       # 48,842 pooled rows, 3,620 with '?'
    assert d.feature_names[:2] == ["age", "hours-per-week"]
    assert_standardized(d.X_train, [0, 1])
    dummies = np.concatenate([d.X_train, d.X_test])[:, 2:]
    assert set(np.unique(dummies)) == {0.0, 1.0}
    for c in fd_income.ADULT_CATEGORICAL:            # exactly one level per categorical column
        cols = [i for i, f in enumerate(d.feature_names) if f.startswith(c + "_")]
        assert np.all(np.concatenate([d.X_train, d.X_test])[:, cols].sum(1) == 1), c
    assert np.array_equal(d.y_test, (d.raw_test["income"] == ">50K").to_numpy())
    ids = np.concatenate([d.ids_train, d.ids_test])
    assert ids.max() < 48842 and (ids >= 32561).sum() == 15060      # adult.test rows kept
    assert abs(np.concatenate([d.y_train, d.y_test]).mean() - 11208 / 45222) < 1e-12


def test_fashion_mnist(cache):
    need(*fd_dataset.LOADERS["fashion_mnist"].files)
    t = time.time()
    d = load_dataset("fashion_mnist", cache_dir=cache)
    assert time.time() - t < 30
    assert d.stand_in_for == "cifar10" and d.n_classes == 10
    assert d.X_train.shape == (60000, 1, 32, 32) and d.X_test.shape == (10000, 1, 32, 32)
    assert d.X_train.dtype == np.float32 and d.y_train.dtype == np.int64
    assert np.array_equal(np.bincount(d.y_train), [6000] * 10)
    assert abs(d.X_train.mean()) < 1e-4 and abs(d.X_train.std() - 1) < 1e-4
    black = (0 - d.extra["mean"][0]) / d.extra["std"][0]
    assert np.allclose(d.X_train[:, :, :2], black) and np.allclose(d.X_test[:, :, :, -2:], black)
    v = d.extra["val_indices"]
    assert len(v) == 1000 and len(set(v)) == 1000 and np.all(np.diff(v) > 0) and v.max() < 10000
    d2 = load_dataset("fashion_mnist", cache_dir=cache)
    assert_same(d, d2)
    assert np.array_equal(v, d2.extra["val_indices"])


def test_sst2_sizes_and_tokenization(cache):
    need("sst2/train.tsv", "sst2/dev.tsv")
    tr, dev = fd_sst2._read_sst2(DATA / "sst2/train.tsv"), fd_sst2._read_sst2(DATA / "sst2/dev.tsv")
    assert (len(tr), len(dev)) == (67349, 872)
    assert tr.label.sum() == 37569 and dev.label.sum() == 444
    d = load_dataset("sst2", cache_dir=cache, limit=40)
    assert d.X_train.shape == (40, 2, 128) and d.X_test.shape == (40, 2, 128)
    assert d.X_train.dtype == np.int64 and d.y_train.dtype == np.int64
    assert d.extra["sentences_train"] == tr.sentence.tolist()[:40]
    assert d.extra["sentences_test"] == dev.sentence.tolist()[:40]
    assert np.array_equal(d.y_test, dev.label.to_numpy()[:40])
    tok = fd_sst2._tokenizer(DEFAULT_ENCODER)
    enc = tok(dev.sentence.tolist()[:40], padding="max_length", truncation=True, max_length=128)
    assert np.array_equal(d.X_test[:, 0], enc["input_ids"])
    assert np.array_equal(d.X_test[:, 1], enc["attention_mask"])
    assert np.all(d.X_train[:, 0, 0] == tok.cls_token_id)
    assert not cache.exists() or not list(cache.iterdir())           # limit: not cached


@pytest.mark.slow
def test_sst2_full(cache):
    need("sst2/train.tsv", "sst2/dev.tsv")
    d = load_dataset("sst2", cache_dir=cache)
    assert d.X_train.shape == (67349, 2, 128) and d.X_test.shape == (872, 2, 128)
    assert d.extra["n_truncated"] == 0
    assert_same(d, load_dataset("sst2", cache_dir=cache))


# ---------------------------------------------------------------------------------------------
# Verification: corrupted, truncated, faithful-but-different files
# ---------------------------------------------------------------------------------------------

def flip_bytes(path: Path, at: float = 0.5, n: int = 4):
    b = bytearray(path.read_bytes())
    i = int(len(b) * at)
    for k in range(i, i + n):
        b[k] ^= 0xFF
    path.write_bytes(bytes(b))


def test_corrupted_file_is_rejected(tmp_path, cache):
    rel = "energy/ENB2012_data.xlsx"
    need(rel)
    root = copy_into(tmp_path, rel)
    flip_bytes(root / rel)
    with pytest.raises(ChecksumError) as e:
        load_dataset("energy", data_dir=root, cache_dir=cache)
    msg = str(e.value)
    assert rel in msg and fd.SOURCES[rel].sha256 in msg and fio.sha256_file(root / rel) in msg
    assert not cache.exists() or not list(cache.iterdir())


def test_concrete_checked_by_cell_values(tmp_path, cache):
    rel = "concrete/Concrete_Data.xls"
    need(rel)
    root = copy_into(tmp_path, rel)
    # a faithful copy saved by another Excel user: other bytes in the WRITEACCESS record only
    b = bytearray((root / rel).read_bytes())
    i = b.find(b"\x5c\x00\x70\x00")
    assert i > 0
    b[i + 8] = ord("X") if b[i + 8] != ord("X") else ord("Y")
    (root / rel).write_bytes(bytes(b))
    assert fio.sha256_file(root / rel) != fd.SOURCES[rel].sha256
    d = load_dataset("concrete", data_dir=root, cache_dir=cache)
    assert d.X_train.shape == (927, 8)
    # a copy whose values differ is rejected with the two fingerprints
    a = fd_files.read_excel(DATA / rel).to_numpy(np.float64)
    cell = struct_double_offset(b, a[0, 8])          # a strength value (a NUMBER record)
    b[cell:cell + 8] = np.float64(a[0, 8] + 1).tobytes()
    (root / rel).write_bytes(bytes(b))
    with pytest.raises(ChecksumError, match="content fingerprint expected " +
                       fd.SOURCES[rel].content_sha256):
        load_dataset("concrete", data_dir=root, cache_dir=cache)


def struct_double_offset(b: bytes, value: float) -> int:
    """Offset of the little-endian float64 ``value`` in the workbook bytes (a NUMBER record)."""
    i = bytes(b).find(np.float64(value).tobytes())
    assert i > 0
    return i


def test_truncated_files_are_rejected(tmp_path, cache):
    rel = "heloc/heloc_dataset_v1.csv"
    need(rel, "fashion-mnist/t10k-labels-idx1-ubyte.gz")
    root = copy_into(tmp_path, rel, "fashion-mnist/t10k-labels-idx1-ubyte.gz")
    p = root / rel
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    with pytest.raises(ChecksumError, match=rel):
        load_dataset("fico", data_dir=root, cache_dir=cache)
    gz = root / "fashion-mnist/t10k-labels-idx1-ubyte.gz"
    gz.write_bytes(gz.read_bytes()[:-100])
    with pytest.raises(ChecksumError, match="cannot be read"):
        fd.verify_file(gz)
    # an intact re-gzipped copy (other gzip header, same content) is accepted
    gz.write_bytes(gzip.compress(gzip.decompress((DATA / "fashion-mnist/t10k-labels-idx1-ubyte.gz")
                                                 .read_bytes()), mtime=0))
    assert fd.verify_file(gz) == fio.sha256_file(gz)


# ---------------------------------------------------------------------------------------------
# Missing files, downloads (file:// URLs only)
# ---------------------------------------------------------------------------------------------

def test_missing_file_offline_names_file_path_and_source(tmp_path, cache):
    with pytest.raises(DataFileError) as e:
        load_dataset("energy", data_dir=tmp_path, cache_dir=cache)
    msg = str(e.value)
    assert not isinstance(e.value, ChecksumError)
    assert "energy/ENB2012_data.xlsx" in msg and str(tmp_path / "energy/ENB2012_data.xlsx") in msg
    assert "archive.ics.uci.edu" in msg and "offline" in msg
    with pytest.raises(DataFileError, match="community.fico.com"):
        load_dataset("fico", data_dir=tmp_path, cache_dir=cache)
    with pytest.raises(DataFileError, match="psam_p25.csv"):
        load_dataset("folktables", data_dir=tmp_path, cache_dir=cache, download=True)


def test_download_false_never_checks_the_network(tmp_path, cache, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("network checked")
    monkeypatch.setattr(fd_files, "_online", boom)
    with pytest.raises(DataFileError, match="download=False"):
        load_dataset("adult", data_dir=tmp_path, cache_dir=cache, download=False)


def test_online_check_does_not_hang():
    t = time.time()
    fd_files._online("unresolvable.invalid", timeout=1.0)
    assert time.time() - t < 2.0


def test_download_is_atomic_and_verified(tmp_path, cache, monkeypatch):
    rel = "energy/ENB2012_data.xlsx"
    need(rel)
    monkeypatch.setattr(fd_files, "_online", lambda *a, **k: True)
    monkeypatch.setitem(fd.SOURCES, rel, replace(fd.SOURCES[rel], url=(DATA / rel).as_uri()))
    root = tmp_path / "raw"
    d = load_dataset("energy", data_dir=root, cache_dir=cache)
    assert d.X_train.shape == (691, 8) and fio.sha256_file(root / rel) == fd.SOURCES[rel].sha256
    assert sorted(p.name for p in (root / "energy").iterdir()) == ["ENB2012_data.xlsx"]
    # a source serving a corrupted file: ChecksumError, nothing left at the destination
    bad = tmp_path / "bad.xlsx"
    shutil.copyfile(DATA / rel, bad)
    flip_bytes(bad)
    monkeypatch.setitem(fd.SOURCES, rel, replace(fd.SOURCES[rel], url=bad.as_uri()))
    root2 = tmp_path / "raw2"
    with pytest.raises(ChecksumError, match="failed verification"):
        load_dataset("energy", data_dir=root2, cache_dir=cache)
    assert list((root2 / "energy").iterdir()) == []


def test_download_extracts_archive_members(tmp_path, monkeypatch):
    need("sst2/train.tsv", "sst2/dev.tsv")
    z = tmp_path / "SST-2.zip"
    with zipfile.ZipFile(z, "w") as f:
        for n in ("train", "dev"):
            f.write(DATA / f"sst2/{n}.tsv", f"SST-2/{n}.tsv")
    for n in ("train", "dev"):
        monkeypatch.setitem(fd.SOURCES, f"sst2/{n}.tsv",
                            replace(fd.SOURCES[f"sst2/{n}.tsv"], url=z.as_uri()))
    root = tmp_path / "raw"
    paths = fd_files.ensure_files(("sst2/train.tsv", "sst2/dev.tsv"), root, True)
    assert {fio.sha256_file(p) for p in paths.values()} == {
        fd.SOURCES["sst2/train.tsv"].sha256, fd.SOURCES["sst2/dev.tsv"].sha256}
    assert sorted(p.name for p in (root / "sst2").iterdir()) == ["dev.tsv", "train.tsv"]


# ---------------------------------------------------------------------------------------------
# Cache: invalidation and no partial writes
# ---------------------------------------------------------------------------------------------

def test_cache_is_rebuilt_when_stale(tmp_path, cache):
    rel = "energy/ENB2012_data.xlsx"
    need(rel)
    root = copy_into(tmp_path, rel)
    d = load_dataset("energy", data_dir=root, cache_dir=cache)
    rec = fio.load_json(cache / "energy.json")
    assert rec["key"]["sources"] == {rel: fd.SOURCES[rel].sha256} == d.files
    # a cache recorded for other source bytes is not used: rebuilt (new token), same numbers
    rec["key"]["sources"][rel] = "0" * 64
    fio.save_json(cache / "energy.json", rec)
    d2 = load_dataset("energy", data_dir=root, cache_dir=cache)
    assert fio.load_json(cache / "energy.json")["token"] != rec["token"]
    assert_same(d, d2)
    # a damaged npz is rebuilt too
    npz = cache / "energy.npz"
    npz.write_bytes(npz.read_bytes()[:1000])
    assert_same(d, load_dataset("energy", data_dir=root, cache_dir=cache))
    # a source corrupted after caching is caught, not served from the cache
    flip_bytes(root / rel)
    with pytest.raises(ChecksumError):
        load_dataset("energy", data_dir=root, cache_dir=cache)


def test_no_partial_cache_on_failure(tmp_path, cache, monkeypatch):
    need("concrete/Concrete_Data.xls")
    real_savez = np.savez

    def dying_savez(fh, **arrays):          # writes part of the archive, then the disk fills
        fh.write(b"PK\x03\x04" + b"\0" * 1000)
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(np, "savez", dying_savez)
    with pytest.warns(UserWarning, match="cache not written"):
        d = load_dataset("concrete", cache_dir=cache)
    assert d.X_train.shape == (927, 8)
    assert list(cache.iterdir()) == []
    # interrupted between the npz and the JSON: the npz is removed, the error propagates
    monkeypatch.setattr(np, "savez", real_savez)

    def interrupted(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(fio, "save_json", interrupted)
    with pytest.raises(KeyboardInterrupt):
        load_dataset("concrete", cache_dir=cache)
    assert list(cache.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# Folktables on a tiny PUMS file, CIFAR-10 on a tiny archive
# ---------------------------------------------------------------------------------------------

def write_pums(root: Path, n: int = 120, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    df = pd.DataFrame({
        "RT": "P", "SERIALNO": [f"2018GQ{i:07d}" for i in range(n)],
        "PWGTP": rng.integers(0, 60, n),
        "AGEP": rng.integers(10, 90, n),
        "COW": rng.choice([1, 2, 3, 6], n).astype(float),
        "SCHL": rng.choice([16, 19, 21, 22], n),
        "MAR": rng.choice([1, 5], n),
        "OCCP": rng.choice([440, 2310, 9300], n).astype(float),
        "POBP": rng.choice([25, 36, 210], n),
        "RELP": rng.choice([0, 1, 2], n),
        "WKHP": rng.choice([np.nan, 20, 40, 60], n),
        "SEX": rng.choice([1, 2], n),
        "RAC1P": rng.choice([1, 2, 6], n),
        "PINCP": rng.choice([50.0, 20000.0, 50000.0, 50001.0, 120000.0], n),
    })
    p = root / fd_files.FOLKTABLES_PUMS
    p.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(p, index=False)
    return df


def test_folktables_on_tiny_pums_file(tmp_path, cache):
    root = tmp_path / "raw"
    df = write_pums(root)
    keep = df[(df.AGEP > 16) & (df.PINCP > 100) & (df.WKHP > 0) & (df.PWGTP >= 1)]
    d = load_dataset("folktables", data_dir=root, cache_dir=cache)
    n = len(keep)
    n_test = int(np.ceil(n * 0.25))
    check_split(d, n - n_test, n_test, n)
    assert set(np.concatenate([d.ids_train, d.ids_test])) == set(keep.index)
    assert d.feature_names[:2] == ["AGEP", "WKHP"]
    n_levels = sum(keep[c].nunique() for c in fd_income.ACS_CATEGORICAL)
    assert d.X_train.shape[1] == 2 + n_levels
    assert "OCCP_9300" in d.feature_names and "COW_6" in d.feature_names
    assert_standardized(d.X_train, [0, 1])
    np.testing.assert_allclose(d.X_train[:, 0] * d.extra["x_std"][0] + d.extra["x_mean"][0],
                               df.AGEP.to_numpy()[d.ids_train])
    assert np.array_equal(d.y_test, (df.PINCP.to_numpy()[d.ids_test] > 50000).astype(int))
    j = d.feature_names.index("OCCP_2310")
    assert np.array_equal(d.X_test[:, j], (df.OCCP.to_numpy()[d.ids_test] == 2310))
    assert np.array_equal(d.raw_test["AGEP"].to_numpy(), df.AGEP.to_numpy()[d.ids_test])
    assert_same(d, load_dataset("folktables", data_dir=root, cache_dir=cache))
    # with the census data dictionary present, raw tables show the category names
    rows = [["VAL", c, "C", 1, str(v), str(v), f"{c} level {v}"]
            for c in fd_income.ACS_CATEGORICAL for v in sorted(df[c].dropna().unique().astype(int))]
    pd.DataFrame(rows).to_csv(root / fd_files.FOLKTABLES_DEFS, header=False, index=False)
    d2 = load_dataset("folktables", data_dir=root, cache_dir=cache)
    assert fd_files.FOLKTABLES_DEFS in d2.files
    assert np.array_equal(d2.X_train, d.X_train)
    assert set(d2.raw_train["OCCP"]) <= {"OCCP level 440", "OCCP level 2310", "OCCP level 9300"}


def write_cifar(path: Path, per_batch: int = 4, n_test: int = 6, payload=None, seed: int = 0):
    rng = np.random.default_rng(seed)
    batches = {}
    with tarfile.open(path, "w:gz") as t:
        names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
        for nm in names:
            n = n_test if nm == "test_batch" else per_batch
            d = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                 b"labels": rng.integers(0, 10, n).tolist(), b"batch_label": nm.encode()}
            batches[nm] = d
            blob = pickle.dumps(payload if (payload is not None and nm == "test_batch") else d,
                                protocol=2)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{nm}")
            info.size = len(blob)
            t.addfile(info, io.BytesIO(blob))
    return batches


def patch_cifar_md5(monkeypatch, path):
    rel = "cifar10/cifar-10-python.tar.gz"
    monkeypatch.setitem(fd.SOURCES, rel, replace(
        fd.SOURCES[rel], md5=hashlib.md5(path.read_bytes()).hexdigest()))


def test_cifar10_on_tiny_archive(tmp_path, cache, monkeypatch):
    root = tmp_path / "raw"
    p = root / "cifar10/cifar-10-python.tar.gz"
    p.parent.mkdir(parents=True)
    b = write_cifar(p)
    with pytest.raises(ChecksumError, match="c58f30108f718f92721af3b95e74349a"):
        load_dataset("cifar10", data_dir=root, cache_dir=cache)    # not the real archive
    patch_cifar_md5(monkeypatch, p)
    d = load_dataset("cifar10", data_dir=root, cache_dir=cache)
    assert d.stand_in_for is None and d.n_classes == 10
    assert d.X_train.shape == (20, 3, 32, 32) and d.X_test.shape == (6, 3, 32, 32)
    assert d.X_train.dtype == np.float32
    u8 = np.concatenate([b[f"data_batch_{i}"][b"data"] for i in range(1, 6)]).reshape(-1, 3, 32, 32)
    labels = sum((b[f"data_batch_{i}"][b"labels"] for i in range(1, 6)), [])
    assert np.array_equal(d.y_train, labels)
    mean = (u8 / 255).mean(axis=(0, 2, 3))
    std = (u8 / 255).std(axis=(0, 2, 3))
    np.testing.assert_allclose(d.extra["mean"], mean, rtol=1e-12)
    np.testing.assert_allclose(d.extra["std"], std, rtol=1e-12)
    te = b["test_batch"][b"data"].reshape(-1, 3, 32, 32)
    ref = (te / 255 - mean[:, None, None]) / std[:, None, None]
    np.testing.assert_allclose(d.X_test, ref, atol=1e-5)
    np.testing.assert_allclose(d.X_train.mean(axis=(0, 2, 3)), 0, atol=1e-5)
    np.testing.assert_allclose(d.X_train.std(axis=(0, 2, 3)), 1, atol=1e-5)
    assert np.array_equal(d.extra["val_indices"], np.arange(6))   # min(1000, n_test) positions
    assert_same(d, load_dataset("cifar10", data_dir=root, cache_dir=cache))


class _Evil:
    def __reduce__(self):
        return (shutil.rmtree, ("/nonexistent-fimoda-test",))


def test_cifar10_refuses_foreign_pickles(tmp_path, cache, monkeypatch):
    root = tmp_path / "raw"
    p = root / "cifar10/cifar-10-python.tar.gz"
    p.parent.mkdir(parents=True)
    write_cifar(p, payload=_Evil())
    patch_cifar_md5(monkeypatch, p)
    with pytest.raises(pickle.UnpicklingError, match="shutil.rmtree"):
        load_dataset("cifar10", data_dir=root, cache_dir=cache)


# ---------------------------------------------------------------------------------------------
# augment_images
# ---------------------------------------------------------------------------------------------

def test_augment_images_deterministic_and_exact():
    x = torch.randn(64, 3, 8, 8)
    a = augment_images(x, torch.Generator().manual_seed(3))
    b = augment_images(x, torch.Generator().manual_seed(3))
    c = augment_images(x, torch.Generator().manual_seed(4))
    assert a.shape == x.shape and a.dtype == x.dtype and torch.equal(a, b) and not torch.equal(a, c)
    # every output is one of the (2p+1)^2 crops of the zero-padded image, possibly mirrored
    xp = torch.nn.functional.pad(x, (4, 4, 4, 4))
    seen_flip, seen_off = set(), set()
    for i in range(len(x)):
        hits = [(dy, dx, f) for dy in range(9) for dx in range(9) for f in (0, 1)
                if torch.equal(a[i], (xp[i, :, dy:dy + 8, dx:dx + 8].flip(-1) if f
                                      else xp[i, :, dy:dy + 8, dx:dx + 8]))]
        assert hits, i
        seen_flip |= {h[2] for h in hits}
        seen_off |= {h[:2] for h in hits}
    assert seen_flip == {0, 1} and len(seen_off) > 20
    # per-channel fill value (e.g. Dataset.extra['pad_value'])
    fill = torch.tensor([-1.0, -2.0, -3.0])
    z = augment_images(torch.zeros(200, 3, 8, 8) + 5, torch.Generator().manual_seed(0), fill=fill)
    for ch in range(3):
        assert set(torch.unique(z[:, ch]).tolist()) == {5.0, float(fill[ch])}


def test_augment_images_dataset_shape():
    x = torch.randn(5, 1, 32, 32)
    out = augment_images(x, torch.Generator().manual_seed(0))
    assert out.shape == (5, 1, 32, 32) and out.is_contiguous()
    with pytest.raises(ValueError, match="B, C, H, W"):
        augment_images(x[0], torch.Generator())


# ---------------------------------------------------------------------------------------------
# Arguments and locations
# ---------------------------------------------------------------------------------------------

def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="unknown dataset"):
        load_dataset("mnist", data_dir=tmp_path)
    with pytest.raises(ValueError, match="unknown keyword"):
        load_dataset("concrete", data_dir=tmp_path, encoder="x")
    with pytest.raises(ValueError, match="limit"):
        load_dataset("sst2", data_dir=tmp_path, limit=0)


def test_dirs_follow_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("FIMODA_DATA_DIR", str(tmp_path / "d"))
    monkeypatch.setenv("FIMODA_CACHE_DIR", str(tmp_path / "c"))
    assert fd.data_dir() == tmp_path / "d" and fd.cache_dir() == tmp_path / "c"
    monkeypatch.delenv("FIMODA_DATA_DIR")
    monkeypatch.delenv("FIMODA_CACHE_DIR")
    assert fd.data_dir() == fio.REPO_ROOT / "data" / "raw"
    assert fd.cache_dir() == fio.REPO_ROOT / "data" / "cache"
