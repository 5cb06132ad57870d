"""Atomic, resumable result files: every write goes to a temporary file that is renamed into place,
so a run killed midway never leaves a partial file behind."""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent


def results_dir(profile: str, dataset: str, root: str | os.PathLike | None = None) -> Path:
    """``results/<profile>/<dataset>/`` (created), under ``root`` or ``$FIMODA_RESULTS_DIR``."""
    base = Path(root or os.environ.get("FIMODA_RESULTS_DIR", REPO_ROOT / "results"))
    d = base / profile / dataset
    d.mkdir(parents=True, exist_ok=True)
    return d


def atomic_write(path: Path, write) -> Path:
    """Call ``write(fh)`` on a temporary file next to ``path`` (binary, flushed and synced), then
    rename it into place; on any error the temporary file is removed and ``path`` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix="." + path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def save_npz(path, **arrays) -> Path:
    """Write ``arrays`` to ``path`` (.npz) atomically."""
    return atomic_write(path, lambda fh: np.savez(fh, **arrays))


def load_npz(path) -> dict:
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def _default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, (set, tuple)):
        return list(o)
    if isinstance(o, Path):
        return str(o)
    return str(o)


def save_json(path, obj) -> Path:
    """Write ``obj`` as indented JSON atomically."""
    data = json.dumps(obj, indent=2, sort_keys=True, default=_default).encode()
    return atomic_write(path, lambda fh: fh.write(data))


def load_json(path):
    with open(path) as fh:
        return json.load(fh)


def sha256_arrays(*arrays) -> str:
    """sha256 over each array's (or tensor's) dtype, shape and bytes (C order), in turn."""
    import torch
    h = hashlib.sha256()
    for a in arrays:
        a = a.detach().cpu().numpy() if torch.is_tensor(a) else a
        a = np.ascontiguousarray(np.asarray(a))
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def sha256_file(path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def figures_dir(profile: str, root: str | os.PathLike | None = None) -> Path:
    """``figures/<profile>/`` (created), under ``root`` or ``$FIMODA_FIGURES_DIR``."""
    base = Path(root or os.environ.get("FIMODA_FIGURES_DIR", REPO_ROOT / "figures"))
    d = base / profile
    d.mkdir(parents=True, exist_ok=True)
    return d
