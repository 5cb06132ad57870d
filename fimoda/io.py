"""Atomic, resumable result files: every write goes to a temporary file that is renamed into place,
so a run killed midway never leaves a partial file behind."""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import zipfile
import zlib
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent


def results_dir(profile: str, dataset: str, root: str | os.PathLike | None = None) -> Path:
    """``results/<profile>/<dataset>/`` (created), under ``root`` or ``$FIMODA_RESULTS_DIR``."""
    base = Path(root or os.environ.get("FIMODA_RESULTS_DIR", REPO_ROOT / "results"))
    d = base / profile / dataset
    d.mkdir(parents=True, exist_ok=True)
    return d


class UnreadableFile(ValueError):
    """A result file that exists but cannot be read back (truncated, half-written by something
    other than :func:`atomic_write`, or not the format its name says); ``path`` names it."""

    def __init__(self, path, reason):
        self.path = Path(path)
        super().__init__(f"cannot read {self.path}: {reason}. The file is truncated or corrupt; "
                         "delete it and rerun the step that writes it")


def _umask() -> int:
    """The process's file-creation mask (read without changing it where /proc allows)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: Path, write) -> Path:
    """Call ``write(fh)`` on a temporary file next to ``path`` (binary, flushed and synced), then
    rename it into place; on any error the temporary file is removed and ``path`` is untouched.
    The file gets the permissions of a normally created one (0666 less the umask)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix="." + path.name, suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())
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
    """Every array of the .npz at ``path``, read in full; :class:`UnreadableFile` (naming the
    file) when it is truncated or corrupt, FileNotFoundError when it does not exist."""
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except FileNotFoundError:
        raise
    except (OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile, zlib.error) as e:
        raise UnreadableFile(path, f"{type(e).__name__}: {e}") from e


def json_default(o):
    """``json.dumps``'s ``default``: numpy scalars and arrays as numbers and lists, sets and
    tuples as lists, anything else (paths, ...) as its ``str``."""
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
    data = json.dumps(obj, indent=2, sort_keys=True, default=json_default).encode()
    return atomic_write(path, lambda fh: fh.write(data))


def load_json(path):
    """The JSON at ``path``; :class:`UnreadableFile` (naming the file) when it is corrupt."""
    try:
        with open(path) as fh:
            return json.load(fh)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UnreadableFile(path, f"{type(e).__name__}: {e}") from e


def differences(old: dict, new: dict, only_new_keys: bool = False) -> list[str]:
    """The dotted keys whose values differ between two nested dicts (JSON-normalised), sorted:
    what a stored record and the expected one disagree on (``only_new_keys``: of the keys that
    ``new`` has, leaving out what only ``old`` records)."""
    def flat(d, pre=""):
        out = {}
        for k, v in (d or {}).items():
            out.update(flat(v, f"{pre}{k}.") if isinstance(v, dict) else {pre + k: v})
        return out
    a = flat(json.loads(json.dumps(old, default=json_default)))
    b = flat(json.loads(json.dumps(new, default=json_default)))
    keys = set(b) if only_new_keys else set(a) | set(b)
    return sorted(k for k in keys if a.get(k) != b.get(k))


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
