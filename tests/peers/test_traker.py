"""fimoda's TRAK_{M=1} vs traker (the TRAK authors' package) on the same model.

traker featurises the training set with the per-example gradients of a "model output" f (for
classification its ``image_classification`` output is the margin log(p_y / (1 - p_y)), fimoda's
Gauss-Newton f; for regression we subclass ``AbstractModelOutput`` with f = the prediction and
Q = -l' = 2 (y - f)), divides them by sqrt(P), and scores targets with
phi(z)^T (X^T X + lambda_reg I)^{-1} phi_i * Q_i (TRAK's tau: fimoda's ``test_side="output"``).

Projection: traker's ``NoOpProjector`` keeps the gradients (k = P), fimoda skips the projection
for k >= P: both compute the unprojected formula, so no random matrix is involved.

Precision: traker computes and inverts X^T X in float32 (``use_half_precision=False`` is its
highest precision), and it rescales the inverse by its mean |entry| (a positive factor). For a
ReLU MLP X^T X is singular (unit-rescaling symmetries, dead units) and ill-conditioned on its
range, so a float32 inverse needs a ridge: both sides use the same ridge, 1e-6 x the largest
eigenvalue (traker's ``lambda_reg`` acts on X^T X / P). The remaining difference is float32
round-off amplified by the conditioning (~1e6), hence a bound of 0.99 rather than 0.99999.
"""
from __future__ import annotations

import copy
import logging

import numpy as np
import pytest
import torch

pytest.importorskip("trak", reason="traker is not installed (bash tests/peers/run.sh)")
from trak import TRAKer  # noqa: E402
from trak.modelout_functions import AbstractModelOutput  # noqa: E402
from trak.projectors import NoOpProjector  # noqa: E402

from fimoda.losses import gn_output, loss_derivatives  # noqa: E402

RIDGE_REL = 1e-6


class RegressionOutput(AbstractModelOutput):
    """f = the prediction; Q = -l'(f) = 2 (y - f) for the squared error (y - f)^2."""

    def __init__(self) -> None:
        super().__init__()

    @staticmethod
    def get_output(model, weights, buffers, x, y):
        out = torch.func.functional_call(model, (weights, buffers), x.unsqueeze(0))
        return out.sum()

    def get_out_to_loss_grad(self, model, weights, buffers, batch):
        x, y = batch
        out = torch.func.functional_call(model, (weights, buffers), x)
        f = gn_output(out, y, "regression")
        d1, _ = loss_derivatives(f, y, "regression")
        return (-d1).detach().unsqueeze(-1)


def test_trak(peer, setup, tmp_path):
    P = sum(p.numel() for p in setup.model.parameters())
    phi = setup.attributor().problem.output_grads(setup.X, setup.Y)
    ridge = RIDGE_REL * float(torch.linalg.eigvalsh(phi.T @ phi)[-1])

    def run():
        model = copy.deepcopy(setup.model)
        task = RegressionOutput() if setup.task == "regression" else "image_classification"
        traker = TRAKer(model=model, task=task, train_set_size=setup.n, save_dir=str(tmp_path),
                        device="cpu",
                        projector=NoOpProjector(device="cpu"), use_half_precision=False,
                        lambda_reg=ridge / P, logging_level=logging.ERROR)
        traker.load_checkpoint(model.state_dict(), model_id=0)
        traker.featurize(batch=(setup.X, setup.Y), num_samples=setup.n)
        traker.finalize_features()
        traker.start_scoring_checkpoint(exp_name="peers", checkpoint=model.state_dict(),
                                        model_id=0, num_targets=len(setup.X_test))
        traker.score(batch=(setup.X_test, setup.Y_test), num_samples=len(setup.X_test))
        scores = traker.finalize_scores(exp_name="peers")           # (n, T), all training
        return np.asarray(scores, dtype=np.float64).T[:, setup.loo_index]
    theirs, t_peer = peer.timed(run)
    mine, t_mine = peer.ours(setup, "trak", proj_dim=P, test_side="output", ridge=ridge)
    cos = peer.row_cosines(theirs, mine)
    peer.record("traker", "TRAKer (NoOp proj)", "trak", setup.task, cos, t_peer, t_mine,
                note=f"k = P = {P}; float32; ridge {RIDGE_REL:g} x top")
    assert cos.min() >= 0.99
