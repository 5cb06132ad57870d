"""The result store: every result fimoda keeps on disk knows what it was computed from.

A stored result is one or more data files plus ``<first file>.record.json``, written last (the
commit marker), holding

- ``inputs``: every input that determines the result's meaning, canonical JSON -- the config
  fields that matter, the sha256 of theta^f's parameters and of the data arrays, the instances,
  and the sha256 of every stored result it was derived from (:func:`source`), so that a changed
  theta^f invalidates everything downstream of it and nothing else;
- ``environment``: what determines the last bits of the arithmetic -- torch version, device
  kind, dtype where the inputs do not name it, and torch's intra-op thread count (a reduction
  split over other threads sums in another order);
- ``files``: the sha256 of each data file, so a file replaced or edited behind the record's back
  is never taken for the recorded one.

:func:`cached` is the one way a result is computed or reused: under the result's file lock
(:func:`fimoda.locks.result_lock`), the same inputs and environment and intact files -> reuse;
anything else -> recompute, saying what changed (``reuse="only"``: one :class:`StaleResult`
naming what differs, nothing computed). :func:`check` is the reuse-only read of a result that
another step computes (a notebook loading notebook 02's gold standard): it compares the inputs
only, since a result is equally valid when it was computed under another thread count.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Callable, Iterable, Optional

from .io import UnreadableFile, atomic_write, differences, load_json, sha256_file
from .locks import result_lock

__all__ = ["StaleResult", "Sourced", "cached", "check", "environment", "record_path",
           "read_record", "source", "write_record", "derived_from", "REUSE"]

FORMAT = 1
REUSE = ("auto", "only", "never")


class StaleResult(ValueError):
    """A stored result was computed from other inputs than the ones asking for it."""


def environment(device="cpu") -> dict:
    """What sets the last bits of a computation here: torch's version, the device kind and the
    intra-op thread count."""
    import torch
    return {"torch": torch.__version__, "device": torch.device(device).type,
            "threads": torch.get_num_threads()}


def canonical(obj):
    """``obj`` as JSON would give it back (tuples as lists, numpy scalars as numbers, keys
    sorted), so that a stored record and a fresh one compare equal when they mean the same."""
    from .io import json_default
    return json.loads(json.dumps(obj, sort_keys=True, default=json_default))


def record_path(path) -> Path:
    """The record of the result file ``path``: ``<file>.record.json`` beside it."""
    path = Path(path)
    return path.with_name(path.name + ".record.json")


_HASHES: dict = {}      # (path, size, mtime_ns, inode) -> sha256: a file is hashed once per process


def _sha(path: Path) -> str:
    st = os.stat(path)
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ino)
    if key not in _HASHES:
        _HASHES[key] = sha256_file(path)
    return _HASHES[key]


def read_record(path) -> Optional[dict]:
    """The record of the result at ``path``, or None when it has none (or an unreadable one)."""
    rp = record_path(path)
    if not rp.exists():
        return None
    try:
        rec = load_json(rp)
    except UnreadableFile:
        return None
    return rec if isinstance(rec, dict) and rec.get("format") == FORMAT else None


def write_record(path, inputs: dict, files: Iterable = (), env: Optional[dict] = None,
                 what: str = "", **info) -> dict:
    """Write the record of the result at ``path`` (its data files already written): the
    sha256 of ``path`` and of every extra data file in ``files``. ``info``: anything else worth
    keeping (wall time, shapes); never compared."""
    path = Path(path)
    names = [path] + [Path(f) for f in files]
    rec = {"format": FORMAT, "what": what, "inputs": canonical(inputs),
           "environment": canonical(env if env is not None else environment()),
           "files": {p.name: _sha(p) for p in names},
           "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "info": canonical(info)}
    data = json.dumps(rec, indent=1, sort_keys=True).encode()
    atomic_write(record_path(path), lambda fh: fh.write(data))
    return rec


def source(path) -> dict:
    """What a result derived from the stored result at ``path`` records of it: its file name and
    sha256 (put it in the derived result's inputs)."""
    path = Path(path)
    return {"file": path.name, "sha256": _sha(path)}


class Sourced(dict):
    """A dict of loaded arrays that remembers the stored results it was read from
    (``sources``: {file name: sha256}), so that what is derived from it -- an evaluation table, a
    figure's data -- can name them (:func:`derived_from`)."""

    def __init__(self, data=(), sources: Optional[dict] = None):
        super().__init__(data)
        self.sources = dict(sources or {})


def derived_from(*loaded) -> dict:
    """{file name: sha256} of every stored result behind ``loaded`` (:class:`Sourced` dicts;
    anything else contributes nothing)."""
    out = {}
    for x in loaded:
        out.update(getattr(x, "sources", {}))
    return dict(sorted(out.items()))


def _why_not(path: Path, rec: Optional[dict], inputs: dict, env: Optional[dict],
             subset: bool = False) -> Optional[str]:
    """Why the stored result at ``path`` cannot stand for ``inputs`` (and ``env``, unless None),
    or None when it can. ``subset``: compare only the keys ``inputs`` has (a reader that knows
    part of what the result was computed from)."""
    if rec is None:
        return "it has no record of what it was computed from" if path.exists() else "none"
    diff = differences(rec.get("inputs", {}), canonical(inputs), only_new_keys=subset)
    if diff:
        shown = ", ".join(diff[:8]) + (f" and {len(diff) - 8} more" if len(diff) > 8 else "")
        return f"it was computed from other inputs (differs in: {shown})"
    if env is not None:
        diff = differences(rec.get("environment", {}), canonical(env))
        if diff:
            old, new = rec.get("environment", {}), canonical(env)
            return "it was computed under another environment (" + ", ".join(
                f"{k}: {old.get(k)} there, {new.get(k)} here" for k in diff) + ")"
    for name, sha in rec.get("files", {}).items():
        f = path.with_name(name)
        if not f.exists():
            return f"its file {f.name} is missing"
        if _sha(f) != sha:
            return (f"its file {f.name} is not the one its record describes (sha256 differs: "
                    "changed, truncated or replaced since it was written)")
    return None


def check(path, inputs: dict, rerun: str) -> dict:
    """The record of the stored result at ``path`` after checking that it stands for
    ``inputs`` -- the part of its inputs the reader knows (the keys of ``inputs``), in any
    environment: FileNotFoundError when there is none, :class:`StaleResult` naming what differs
    and the step ``rerun`` that recomputes it otherwise."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no result at {path}: run {rerun} first")
    rec = read_record(path)
    why = _why_not(path, rec, inputs, None, subset=True)
    if why is not None:
        raise StaleResult(f"{path} cannot be used here: {why}; rerun {rerun}")
    return rec


def cached(path, inputs: dict, compute: Callable[[], object], load: Callable[[Path], object],
           what: str = "", reuse: str = "auto", device="cpu", lock: bool = True,
           files: Iterable = (), rerun: str = "", quiet: bool = False,
           threads: Optional[int] = None):
    """The result at ``path`` for ``inputs``: loaded (``load(path)``) when its record says it
    was computed from these inputs in this environment and its files are intact, else computed.
    ``compute()`` writes the data files itself (atomically: ``path`` and the extra ``files``) and
    returns a dict of extra record information (or None); the record is written after it.

    ``reuse``: "auto" (reuse or recompute), "only" (reuse, or :class:`StaleResult` naming what
    differs -- nothing is computed), "never" (always recompute). ``lock``: hold the result's
    file lock throughout (False where the caller coordinates itself, e.g. job-array shards).
    A recomputation that replaces an existing result prints one line saying why. ``threads``:
    the intra-op thread count the computation runs with when it sets its own (None: this
    process's)."""
    if reuse not in REUSE:
        raise ValueError(f"reuse must be one of {REUSE}, got {reuse!r}")
    path = Path(path)
    env = environment(device)
    if threads is not None:
        env["threads"] = int(threads)
    import contextlib
    guard = result_lock(path, what) if lock else contextlib.nullcontext()
    with guard:
        why = "recomputation asked for" if reuse == "never" else \
            _why_not(path, read_record(path), inputs, env)
        if why is None:
            return load(path)
        if reuse == "only":
            raise StaleResult(f"{path} cannot be reused: {why}"
                              + (f"; rerun {rerun}" if rerun else ""))
        if why != "none" and not quiet:
            print(f"{what or path.name}: recomputing, the stored one cannot be reused ({why})")
        info = compute() or {}      # a failure midway leaves files the old record's sha256 refuse
        write_record(path, inputs, files, env, what, **info)
        return load(path)
