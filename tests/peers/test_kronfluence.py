"""fimoda's EK-FAC vs kronfluence's (strategy "ekfac") on the same float64 model.

kronfluence's conventions: ``Task.compute_train_loss`` is a SUM over the batch; its covariance
factors A, S and the eigenvalue correction Lambda are MEANS over the examples; ``damping_factor``
is added to that mean Lambda. fimoda's ekfac with ``risk="mean"`` adds its ``damping`` to the
eigenvalues of the mean Gauss-Newton too, so damping_factor = damping = lambda_mean and the
scores are equal (scale ratio 1).

The curvature. With ``use_empirical_fisher=False`` kronfluence calls
``compute_train_loss(sample=True)`` and builds the factors from the gradients of that loss; the
task decides what it is ("sample from the model's outputs ... to approximate the true Fisher").
For our losses the true Fisher is exactly the Gauss-Newton sum_n l''_n grad f_n grad f_n^T
(E over y ~ model of l'(f)^2 = l''(f) for the cross-entropy, and for the squared error with the
Gaussian y ~ N(f, 1/2)). ``test_ekfac_exact_fisher`` returns the deterministic pseudo-loss
sum_n sqrt(l''_n) f_n, whose per-example gradients have exactly those outer products: the same
formula as fimoda, so we assert cosine >= 0.99999. ``test_ekfac_sampled_fisher`` uses
kronfluence's usual Monte-Carlo labels (one draw per example); its factors are a noisy estimate of
the same matrix, so only a weaker bound holds.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch.utils.data import TensorDataset

pytest.importorskip("kronfluence", reason="kronfluence is not installed (bash tests/peers/run.sh)")
from kronfluence.analyzer import Analyzer, prepare_model  # noqa: E402
from kronfluence.arguments import FactorArguments, ScoreArguments  # noqa: E402
from kronfluence.task import Task  # noqa: E402

from fimoda.losses import gn_output, loss_derivatives, loss_from_f  # noqa: E402

F64 = torch.float64


class _Task(Task):
    def __init__(self, task: str, sampled: bool):
        super().__init__()
        self.task, self.sampled = task, sampled

    def _loss_sum(self, out, y):
        return loss_from_f(gn_output(out, y, self.task), y, self.task).sum()

    def compute_train_loss(self, batch, model, sample=False):
        x, y = batch
        out = model(x)
        if not sample:
            return self._loss_sum(out, y)
        if self.sampled:                       # one Monte-Carlo label per example
            with torch.no_grad():
                if self.task == "regression":
                    y_s = out.reshape(y.shape) + torch.randn_like(y) * 0.5 ** 0.5
                else:
                    y_s = torch.multinomial(torch.softmax(out, dim=-1), 1).squeeze(-1)
            return self._loss_sum(out, y_s)
        f = gn_output(out, y, self.task)      # exact Fisher = Gauss-Newton pseudo-gradients
        _, d2 = loss_derivatives(f.detach(), y, self.task)
        return (d2.sqrt() * f).sum()

    def compute_measurement(self, batch, model):
        x, y = batch
        return self._loss_sum(model(x), y)


def _kronfluence_scores(peer, setup, tmp_path, sampled: bool):
    def run():
        torch.manual_seed(0)
        model = copy.deepcopy(setup.model)
        task = _Task(setup.task, sampled)
        model = prepare_model(model, task)
        analyzer = Analyzer("peers", model, task, cpu=True, output_dir=str(tmp_path),
                            disable_tqdm=True, disable_model_save=True)
        factor_args = FactorArguments(
            strategy="ekfac", use_empirical_fisher=False,
            covariance_max_examples=None, lambda_max_examples=None,
            activation_covariance_dtype=F64, gradient_covariance_dtype=F64,
            eigendecomposition_dtype=F64, lambda_dtype=F64, per_sample_gradient_dtype=F64)
        analyzer.fit_all_factors("ekfac", TensorDataset(setup.X, setup.Y),
                                 per_device_batch_size=setup.n, factor_args=factor_args,
                                 overwrite_output_dir=True)
        score_args = ScoreArguments(damping_factor=setup.lam_mean, per_sample_gradient_dtype=F64,
                                    precondition_dtype=F64, score_dtype=F64)
        analyzer.compute_pairwise_scores(
            "scores", "ekfac", query_dataset=TensorDataset(setup.X_test, setup.Y_test),
            train_dataset=TensorDataset(setup.X_loo, setup.Y_loo),
            per_device_query_batch_size=len(setup.X_test),
            per_device_train_batch_size=len(setup.X_loo), score_args=score_args,
            overwrite_output_dir=True)
        return analyzer.load_pairwise_scores("scores")["all_modules"]
    return peer.timed(run)


def test_ekfac_exact_fisher(peer, setup, tmp_path):
    theirs, t_peer = _kronfluence_scores(peer, setup, tmp_path, sampled=False)
    mine, t_mine = peer.ours(setup, "ekfac", risk="mean", damping=setup.lam_mean)
    cos = peer.row_cosines(theirs, mine)
    ratio = peer.scale_ratio(theirs, mine)
    peer.record("kronfluence", "ekfac (exact Fisher)", "ekfac", setup.task, cos, t_peer, t_mine,
                ratio=ratio, note="pseudo-loss sum sqrt(l'') f")
    assert cos.min() >= 0.99999
    assert ratio == pytest.approx(1.0, rel=1e-4)


def test_ekfac_sampled_fisher(peer, setup, tmp_path):
    """One sampled label per example (kronfluence's usual true-Fisher estimate): the factors are
    a Monte-Carlo estimate of fimoda's, so the cosine is below 1; we require >= 0.9."""
    theirs, t_peer = _kronfluence_scores(peer, setup, tmp_path, sampled=True)
    mine, t_mine = peer.ours(setup, "ekfac", risk="mean", damping=setup.lam_mean)
    cos = peer.row_cosines(theirs, mine)
    peer.record("kronfluence", "ekfac (sampled y)", "ekfac", setup.task, cos, t_peer, t_mine,
                note="Monte-Carlo Fisher, 1 draw")
    assert cos.min() >= 0.9
