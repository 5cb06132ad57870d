"""The gold standard's work directory: ``config.json`` (the fingerprint of what the further
training depends on) and one ``seed<s>_chunk<c>.npz`` per finished (seed, chunk) piece.

Each piece carries its own provenance: the work-directory format, the configuration hash, its
seed and chunk, the arithmetic environment it was computed in (torch version, device kind, torch
intra-op thread count: :func:`fimoda.store.environment`) and a sha256 of its arrays.
:func:`load_piece` verifies all of them, so a truncated or half-written file, a piece of another
configuration, or one of another seed or chunk copied over it is reported (a warning naming the
file) and recomputed, never used. A piece computed under another thread count (a run interrupted
on one thread and resumed on two) is recomputed too, with one warning naming both counts: every
result equals a clean run under the environment that finishes it, never a mix of two.
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ..io import UnreadableFile, differences, load_json, load_npz, save_json, save_npz, \
    sha256_arrays

log = logging.getLogger(__name__)

# version of the work-directory layout. 2: each piece stores its format, configuration hash,
# seed, chunk and the sha256 of its arrays (format 1 stored loss, dist, left only).
FORMAT = 2


def fingerprint(model, task, X, Y, Xt, Yt, loo, cfg, engine, chunk, block, augment,
                loss=None) -> dict:
    """What the pieces depend on (everything but the seeds: more seeds reuse the pieces). Runs
    leaving out groups record them under ``groups`` ((m, G) rows, :mod:`fimoda.gold.groups`),
    leave-one-out runs their indices under ``loo``, so the two never share a directory. A model
    with frozen parameters records the names it trains under ``trained`` (a model training all
    of its parameters records nothing more, so its fingerprint is unchanged)."""
    custom = {} if loss is None else {"loss": getattr(loss, "__qualname__", repr(loss))}
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    if frozen:       # which parameters are trained (e.g. LoRA adapters only: fimoda.lora)
        custom["trained"] = [n for n, p in model.named_parameters() if p.requires_grad]
    return {**custom, "format": FORMAT, "config": cfg.numeric(), "engine": engine.name,
            "chunk_runs": chunk, "run_block": block, "device": torch.device(cfg.device).type,
            "task": task, "model": type(model).__name__,
            "theta": sha256_arrays(*[v for _, v in sorted(model.state_dict().items())]),
            "train": sha256_arrays(X, Y), "test": sha256_arrays(Xt, Yt),
            ("groups" if loo.ndim == 2 else "loo"): loo.tolist(),
            "augment": None if augment is None else getattr(augment, "__qualname__", repr(augment))}


def fingerprint_hash(fp: dict) -> str:
    return hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()


def open_workdir(workdir, fp: dict, mismatch: str = "error") -> tuple[Path, str]:
    """(the work directory, created with ``fp`` recorded if new, and ``fp``'s hash). A directory
    of another configuration, or written in another layout version, is a ValueError saying
    what differs (``mismatch="replace"``: it is removed, with a warning saying what differed,
    and started anew -- for a work directory that belongs to a stored result being recomputed
    because its inputs changed)."""
    if mismatch not in ("error", "replace"):
        raise ValueError(f"mismatch must be 'error' or 'replace', got {mismatch!r}")
    wd = Path(workdir)
    meta = wd / "config.json"
    h = fingerprint_hash(fp)
    if meta.exists() and mismatch == "replace":
        try:
            old = load_json(meta)
        except UnreadableFile:
            old = {}
        if old.get("hash") != h:
            import shutil
            diff = differences(old.get("fingerprint", {}), fp)
            log.warning("work directory %s holds pieces of other inputs (differs in: %s): "
                        "removing it", wd, ", ".join(diff) or "format")
            shutil.rmtree(wd)
    if meta.exists():
        try:
            old = load_json(meta)
        except UnreadableFile as e:
            raise ValueError(f"{e} (work directory {wd}: delete the directory to recompute)")
        fmt = old.get("fingerprint", {}).get("format")
        if fmt != FORMAT:
            raise ValueError(f"work directory {wd} was written in work-directory format {fmt} "
                             f"and this fimoda reads format {FORMAT} (its pieces carry no "
                             "seed, chunk or checksum to verify); delete the directory to "
                             "recompute its pieces")
        if old.get("hash") != h:
            diff = differences(old.get("fingerprint", {}), fp)
            raise ValueError(f"work directory {wd} holds further-training results of a different "
                             f"configuration (differs in: {', '.join(diff) or 'hash'}); use "
                             "another workdir or delete this one")
    else:
        wd.mkdir(parents=True, exist_ok=True)
        save_json(meta, {"hash": h, "fingerprint": fp})
    return wd, h


def save_piece(path: Path, config_hash: str, seed: int, chunk: int, left: np.ndarray,
               loss: np.ndarray, dist: np.ndarray, env: Optional[dict] = None) -> Path:
    """Write one piece atomically with its provenance (``env``: the arithmetic environment it
    was computed in) and checksum."""
    meta = {"format": FORMAT, "hash": config_hash, "seed": int(seed), "chunk": int(chunk),
            "env": env, "sha256": sha256_arrays(loss, dist, left)}
    return save_npz(path, loss=loss, dist=dist, left=left, meta=np.asarray(json.dumps(meta)))


class OtherEnvironment(str):
    """Why a piece is not used: it was computed under another arithmetic environment."""


def _env_text(env) -> str:
    if not isinstance(env, dict):
        return "an unrecorded environment"
    return (f"{env.get('threads')} intra-op thread(s), torch {env.get('torch')}, "
            f"{env.get('device')}")


def _problem(z: dict, config_hash: str, seed: int, chunk: int, left: np.ndarray,
             shape: tuple, env: Optional[dict] = None) -> Optional[str]:
    """Why the arrays ``z`` of a piece file are not piece (seed, chunk), or None when they are."""
    if not {"loss", "dist", "left", "meta"} <= set(z):
        return f"it lacks arrays (has {sorted(z)})"
    try:
        meta = json.loads(str(z["meta"]))
    except ValueError:
        return "its provenance record is not JSON"
    if meta.get("format") != FORMAT:
        return f"it is in work-directory format {meta.get('format')}, not {FORMAT}"
    if meta.get("hash") != config_hash:
        return "it was computed for another configuration"
    if (meta.get("seed"), meta.get("chunk")) != (seed, chunk):
        return (f"it holds seed {meta.get('seed')} chunk {meta.get('chunk')}, not seed {seed} "
                f"chunk {chunk}")
    if not np.array_equal(z["left"], left) or z["loss"].shape != shape \
            or z["dist"].shape != shape[:2]:
        return "its runs or shapes are not this chunk's"
    if sha256_arrays(z["loss"], z["dist"], z["left"]) != meta.get("sha256"):
        return "its arrays do not match their checksum"
    if env is not None and meta.get("env") != env:
        return OtherEnvironment(f"computed with {_env_text(meta.get('env'))}, and this run uses "
                                f"{_env_text(env)}")
    return None


_TOLD: set = set()      # (work directory, what) told once per process


def load_piece(path: Optional[Path], config_hash: str, seed: int, chunk: int, left: np.ndarray,
               shape: tuple, env: Optional[dict] = None):
    """(test losses, distances) of the piece at ``path`` after verifying it (``env``: the
    arithmetic environment it must have been computed in; None: any), or None when it is absent
    or fails verification (then a warning names the file and why -- once per work directory for
    pieces of another environment --; it is recomputed)."""
    if path is None or not path.exists():
        return None
    try:
        z = load_npz(path)
    except UnreadableFile as e:
        why = str(e)
    else:
        why = _problem(z, config_hash, seed, chunk, left, shape, env)
        if why is None:
            return z["loss"], z["dist"]
        if isinstance(why, OtherEnvironment):
            if (str(path.parent), str(why)) not in _TOLD:
                _TOLD.add((str(path.parent), str(why)))
                log.warning("pieces in %s were %s (the thread count changes the last bits of "
                            "the sums): recomputing them rather than mixing the two; set "
                            "OMP_NUM_THREADS to the first run's count to reuse them",
                            path.parent, why)
            return None
        why = f"{path} is not a valid piece: {why}"
    log.warning("%s; recomputing it", why)
    return None
