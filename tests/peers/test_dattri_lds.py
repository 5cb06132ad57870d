"""fimoda.metrics.lds vs dattri.metric.lds on the same inputs.

dattri takes ``score`` (n_train, n_test) with its sign (higher = more helpful, as fimoda's) and
``ground_truth = (values (M, n_test), indices (M, k))``, the indices being the training instances
each model was trained WITH; its values are a utility (higher is better), so a loss is passed
negated -- fimoda's ``target="loss"`` does that negation itself.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("dattri", reason="dattri is not installed (bash tests/peers/run.sh)")
from dattri.metric import lds as dattri_lds  # noqa: E402

from fimoda.metrics import lds  # noqa: E402


def test_lds_equals_dattri():
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(10, 40))                          # fimoda: (test, train)
    subsets = np.stack([rng.choice(40, 20, replace=False) for _ in range(50)])
    summed = np.stack([scores[:, s].sum(1) for s in subsets])  # (M, test)
    losses = 1.0 - 0.1 * summed + rng.normal(size=summed.shape)
    ours = lds(scores, subsets, losses)
    theirs, _ = dattri_lds(torch.as_tensor(scores.T), (torch.as_tensor(-losses),
                                                       torch.as_tensor(subsets)))
    np.testing.assert_allclose(ours.per_test, theirs.numpy(), rtol=1e-12, atol=1e-14)
    assert ours.mean > 0.3                  # the datamodel is real: not a comparison of noise
