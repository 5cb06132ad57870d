"""The on-disk cache of built datasets: ``<cache>/<name>[_<encoder>].npz`` + a ``.json`` twin.

The builders' ``parts`` are encoded into plain arrays (strings packed as NUL-separated UTF-8, no
pickles) and a JSON description. The JSON also records the key the arrays were built under
(:data:`CACHE_FORMAT`, dataset name, keyword arguments, source sha256s) and a random token that
the npz carries too, so a later load reuses the arrays only when its key is the same and both
files come from one write; otherwise the dataset is rebuilt.
"""
from __future__ import annotations

import re
import secrets
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd

from .. import io as fio

CACHE_FORMAT = 1          # bump when a builder changes: every cache is then rebuilt


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", s).strip("-")[-80:]


def _pack_strings(values) -> np.ndarray:
    """Strings -> one uint8 array: UTF-8, NUL-separated (no pickles in the cache)."""
    vals = ["" if v is None else str(v) for v in values]
    if any("\x00" in v for v in vals):
        raise ValueError("strings containing NUL cannot be cached")
    return np.frombuffer("\x00".join(vals).encode("utf-8"), np.uint8).copy()


def _unpack_strings(a: np.ndarray, n: int) -> list:
    if n == 0:
        return []
    out = a.tobytes().decode("utf-8").split("\x00")
    if len(out) != n:
        raise ValueError(f"packed strings: expected {n}, found {len(out)}")
    return out


def encode_parts(parts: dict) -> tuple[dict, dict]:
    """Parts -> (npz arrays, JSON-able description)."""
    arrays = {k: np.asarray(parts[k]) for k in
              ("X_train", "y_train", "X_test", "y_test", "ids_train", "ids_test")}
    meta = dict(feature_names=list(parts["feature_names"]), raw={}, extra={}, extra_arrays=[],
                extra_strings={})
    for which in ("raw_train", "raw_test"):
        df = parts[which]
        if df is None:
            meta["raw"][which] = None
            continue
        cols = []
        for i, c in enumerate(df.columns):
            s = df[c]
            a = s.to_numpy()
            if (pd.api.types.is_numeric_dtype(s) and not pd.api.types.is_bool_dtype(s)
                    and a.dtype != object):
                arrays[f"{which}.{i}"] = a
                cols.append([str(c), "num"])
            else:
                arrays[f"{which}.{i}"] = _pack_strings(s.tolist())
                cols.append([str(c), "str"])
        meta["raw"][which] = cols
    for k, v in parts["extra"].items():
        if isinstance(v, np.ndarray):
            arrays[f"extra.{k}"] = v
            meta["extra_arrays"].append(k)
        elif isinstance(v, list) and len(v) > 100 and all(isinstance(s, str) for s in v):
            arrays[f"extra.{k}"] = _pack_strings(v)
            meta["extra_strings"][k] = len(v)
        else:
            meta["extra"][k] = v
    return arrays, meta


def decode_parts(arrays: dict, meta: dict) -> dict:
    parts = {k: arrays[k] for k in
             ("X_train", "y_train", "X_test", "y_test", "ids_train", "ids_test")}
    parts["feature_names"] = list(meta["feature_names"])
    for which, ids in (("raw_train", "ids_train"), ("raw_test", "ids_test")):
        cols = meta["raw"][which]
        if cols is None:
            parts[which] = None
            continue
        n = len(arrays[ids])
        data = {c: (arrays[f"{which}.{i}"] if kind == "num"
                    else _unpack_strings(arrays[f"{which}.{i}"], n))
                for i, (c, kind) in enumerate(cols)}
        parts[which] = pd.DataFrame(data, index=pd.Index(arrays[ids]))
    extra = dict(meta["extra"])
    for k in meta["extra_arrays"]:
        extra[k] = arrays[f"extra.{k}"]
    for k, n in meta["extra_strings"].items():
        extra[k] = _unpack_strings(arrays[f"extra.{k}"], n)
    parts["extra"] = extra
    return parts


def cache_paths(cache: Path, name: str, kw: dict) -> tuple[Path, Path]:
    stem = name + (f"_{_slug(kw['encoder'])}" if kw.get("encoder") else "")
    return cache / f"{stem}.npz", cache / f"{stem}.json"


def read_cache(npz: Path, js: Path, key: dict) -> Optional[tuple[dict, dict]]:
    """Cached (arrays, meta) when the JSON's key (format, kwargs, source sha256s) equals ``key``
    and the npz carries the same write token; else None (the cache is rebuilt)."""
    if not (npz.is_file() and js.is_file()):
        return None
    try:
        rec = fio.load_json(js)
        if rec.get("key") != key:
            return None
        arrays = fio.load_npz(npz)
        if str(arrays.pop("_token", np.array("")).item()) != rec.get("token"):
            return None
        return arrays, rec["meta"]
    except Exception:     # unreadable / partial / foreign file: rebuild
        return None


def write_cache(npz: Path, js: Path, key: dict, arrays: dict, meta: dict) -> None:
    """npz then JSON, each atomic (:mod:`fimoda.io`), paired by a random token. On any failure
    both are removed, so no partial or mismatched cache is left behind."""
    token = secrets.token_hex(16)
    try:
        fio.save_npz(npz, _token=np.array(token), **arrays)
        fio.save_json(js, dict(key=key, token=token, meta=meta))
    except BaseException:
        for p in (js, npz):
            try:
                p.unlink()
            except FileNotFoundError:
                pass
        raise
