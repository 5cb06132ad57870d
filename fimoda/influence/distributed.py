"""A method's scores over chunks of test points as Dask tasks: every test point's score row
depends only on that point and on what the :class:`~.common.Attributor` fitted once (per-example
gradients of the left-out set, lambda_G, kernels, spectra, EK-FAC factors), so the test set splits
into independent pieces. The first chunk is scored here, which fits the Attributor; each other
chunk travels with a copy of that fitted state to a worker of ``client``
(:func:`fimoda.gold.distributed.cluster_client` makes one) and is scored there.

Row for row the scores equal one call of :func:`~fimoda.influence.compute_scores` on the whole
test set up to the block solvers' tolerance (CG and the Krylov series solve all of a chunk's
right-hand sides together, so their rounding depends on which points share a chunk)."""
from __future__ import annotations

import copy

import numpy as np

from .common import Attributor


def with_test_rows(att: Attributor, rows: np.ndarray) -> Attributor:
    """An Attributor for the test points ``rows`` of ``att`` sharing its problem, left-out set,
    fitted state and cached left-out gradients (a shallow copy: nothing is recomputed)."""
    sub = copy.copy(att)
    sub.X_test, sub.Y_test = att.X_test[rows], att.Y_test[rows]
    sub.__dict__.pop("test_grads", None)          # the cached gradients of the whole test set
    sub.shared = {}                              # solves keyed by right-hand sides of other rows
    return sub


def scores_on_dask(client, name: str, att: Attributor, cfg=None, chunk: int = 64) -> np.ndarray:
    """Scores ``[test, left_out]`` of method ``name`` (config ``cfg``, or its defaults) with the
    test points in chunks of ``chunk``, one Dask task per chunk after the first."""
    from . import compute_scores
    if not (isinstance(chunk, int) and chunk >= 1):
        raise ValueError(f"chunk must be a positive int, got {chunk!r}")
    J = len(att.X_test)
    pieces = [np.arange(a, min(a + chunk, J)) for a in range(0, J, chunk)]
    _ = (att.train_grads, att.lambda_G)     # computed once here, inherited by every chunk's copy
    first = np.asarray(compute_scores(name, with_test_rows(att, pieces[0]), cfg))   # fits att
    futures = [client.submit(_score_chunk, name, with_test_rows(att, rows), cfg, pure=False)
               for rows in pieces[1:]]
    return np.concatenate([first] + client.gather(futures), axis=0)


def _score_chunk(name: str, att: Attributor, cfg) -> np.ndarray:
    from . import compute_scores
    return np.asarray(compute_scores(name, att, cfg))
