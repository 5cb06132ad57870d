"""Image datasets: CIFAR-10 and its offline stand-in Fashion-MNIST, and their augmentation.

The builders keep uint8 images (N, C, 32, 32) with the per-channel training mean and std and a
fixed validation subset of the test set; :func:`finish_images` standardizes them to float32 on
every load (fresh build or cache hit), and :func:`augment_images` is the CIFAR-10 recipe's
training-time random crop and horizontal flip.
"""
from __future__ import annotations

import gzip
import pickle
import tarfile

import numpy as np
import torch

from .files import DataFileError

VAL_SIZE = 1000           # images: fixed validation subset of the test set (paper App. D.1)
VAL_SEED = 0

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


def build_fashion_mnist(paths, root, **kw) -> dict:
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


def build_cifar10(paths, root, **kw) -> dict:
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


def finish_images(parts: dict) -> dict:
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
