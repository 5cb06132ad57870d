"""The frozen trunk of a text model (configs with ``trainable_layers``): the embeddings and the
encoder layers below the top k stay at their pretrained values, so their output for every sentence
is computed once (:func:`trunk_features`) and the top layers with the head
(:class:`fimoda.models.TextTop`) are what the final model, the gold standard and every method
train and attribute (:func:`frozen_trunk`); the features are cached next to the results."""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch

from .. import store
from ..io import load_npz, save_npz, sha256_arrays
from ..models import TextTop, input_trimmer
from ..progress import progress_bar
from ..settings import ExperimentConfig
from ..tensors import as_inputs
from .rows import dataset_with

__all__ = ["TRUNK_FILE", "TRUNK_BATCH", "trunk_features", "frozen_trunk"]

TRUNK_FILE = "trunk_features.npz"
TRUNK_BATCH = 64


def trunk_features(clf, k: int, X: torch.Tensor, batch: int = TRUNK_BATCH,
                   progress: bool = True) -> torch.Tensor:
    """:meth:`~fimoda.models.TextClassifier.trunk_features` of every row of ``X`` (N, 2, L),
    in batches each cut to its longest sentence, padded back to the longest of all: (N, L', H+1)
    with L' the longest sentence of ``X``."""
    trim = input_trimmer(clf)
    was = clf.training
    clf.eval()
    # batches of similar length (sorted), so little of each is padding; rows go back in order
    order = torch.argsort(X[:, 1].ne(0).sum(1), stable=True)
    try:
        length = trim(X).shape[-1]
        out = None
        it = range(0, len(X), batch)
        for s in progress_bar(it, desc="frozen trunk", leave=False,
                              disable=not progress or len(X) <= batch):
            rows = order[s:s + batch].to(X.device)
            f = clf.trunk_features(trim(X[rows]), k)
            if out is None:
                out = f.new_zeros((len(X), length, f.shape[-1]))
            out[rows, :f.shape[1]] = f
    finally:
        clf.train(was)
    return out


def _trunk_sha(clf, k: int) -> str:
    """sha256 of the frozen parameters (every encoder parameter outside the top k layers)."""
    top = {id(p) for p in TextTop(clf, k).parameters()}
    h = hashlib.sha256()
    for name, p in clf.encoder.named_parameters():
        if id(p) not in top:
            h.update(name.encode())
            h.update(p.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def frozen_trunk(cfg: ExperimentConfig, clf, ds, directory=None, progress: bool = True):
    """(the top model, ``ds`` with token inputs replaced by trunk features) for a text config
    with ``trainable_layers``: what the gold standard and every method then work on. The features
    of the training and test rows are cached in ``<directory>/trunk_features.npz`` (only the
    real tokens of each sentence), keyed by the frozen parameters and the token arrays."""
    k = cfg.trainable_layers
    key = {"k": k, "dtype": cfg.dtype, "trunk_sha256": _trunk_sha(clf, k),
           "tokens_sha256": sha256_arrays(ds.X_train, ds.X_test)}
    p = next(clf.parameters())
    features = lambda: [trunk_features(clf, k, as_inputs(a, p.dtype, p.device), progress=progress)
                        for a in (ds.X_train, ds.X_test)]
    if directory is None:
        feats = features()
    else:
        path = Path(directory) / TRUNK_FILE

        def compute():        # only the real tokens are kept; padding comes back as zeros
            packed = {}
            for part, f in zip(("train", "test"), features()):
                packed[f"{part}_tokens"], packed[f"{part}_lengths"] = _pack(f)
            save_npz(path, **packed)

        def load(q):
            z = load_npz(q)
            return [_unpack(z[f"{part}_tokens"], z[f"{part}_lengths"]) for part in ("train", "test")]

        feats = store.cached(path, key, compute, load, device=p.device,
                             what=f"the frozen trunk's features of {cfg.dataset}")
    top = TextTop(clf, k).eval()
    X_train, X_test = (f.cpu().numpy() for f in feats)
    changes = dict(X_train=X_train, X_test=X_test,
                   feature_names=[f"layer {top.first} input"] * (X_train.shape[-1] - 1)
                   + ["attention_mask"])
    return top, dataset_with(ds, changes)


def _pack(f: torch.Tensor):
    """(real-token rows (sum of lengths, H+1), lengths (N,)) of padded features (N, L, H+1)."""
    keep = f[..., -1].ne(0)
    lengths = keep.sum(1)
    if not torch.equal(keep, torch.arange(f.shape[1], device=f.device)[None] < lengths[:, None]):
        raise ValueError("trunk features: the attention mask is not a prefix of ones (the "
                         "tokenizer padded on the left?); cannot store them compactly")
    return f[keep].cpu().numpy(), lengths.cpu().numpy()


def _unpack(tokens, lengths) -> torch.Tensor:
    lengths = np.asarray(lengths)
    out = np.zeros((len(lengths), int(lengths.max()), tokens.shape[-1]), dtype=tokens.dtype)
    keep = np.arange(out.shape[1])[None, :] < lengths[:, None]
    out[keep] = tokens
    return torch.from_numpy(out)
