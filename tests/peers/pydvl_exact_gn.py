"""pyDVL's CG and LiSSA on EXACTLY fimoda's damped mean Gauss-Newton matrix G/n + lambda I (eq. 12).

pyDVL's Gauss-Newton operator is (1/|b|) sum_i grad l~_i grad l~_i^T of the loss l~ it is given;
its own ``SecondOrderMode.GAUSS_NEWTON`` passes the real loss (the empirical Fisher, weights
l'^2). Given the pseudo-loss l~_i = sqrt(l''_i) f_i (:func:`gn_pseudo_loss`; l'' at the detached
f, pyDVL evaluates it one example at a time) the outer products are l''_i grad f_i grad f_i^T:
the mean Gauss-Newton matrix. The gradients that enter the scores stay those of the real loss.
Shared by tests/peers/test_pydvl.py (where it is checked densely and score by score) and
benchmarks/methods_speed.py. Importing this module needs pyDVL (ImportError otherwise).
"""
from __future__ import annotations

from pydvl.influence.torch import CgInfluence, LissaInfluence
from pydvl.influence.torch.base import TorchGradientProvider, TorchOperatorGradientComposition
from pydvl.influence.torch.batch_operation import ChunkAveraging, GaussNewtonBatchOperation
from pydvl.influence.torch.operator import CgOperator, GaussNewtonOperator, LissaOperator
from torch.utils.data import DataLoader

from fimoda.losses import gn_output, loss_derivatives


def gn_pseudo_loss(task: str):
    """l~(out, y) = sum_b sqrt(l''(f_b)) f_b with f = gn_output(out, y) and l'' evaluated at the
    DETACHED f. pyDVL calls it on one example at a time (vmap), where grad l~ grad l~^T =
    l'' grad f grad f^T: its Gauss-Newton operator (1/|b|) sum_i grad l~_i grad l~_i^T is then
    the Gauss-Newton matrix of the mean loss, G/n of fimoda's eq. (12)."""
    def pseudo_loss(out, y):
        f = gn_output(out, y, task)
        _, d2 = loss_derivatives(f.detach(), y, task)
        return (d2.sqrt() * f).sum()
    return pseudo_loss


def one_batch(data: DataLoader) -> None:
    if len(data) != 1:
        raise ValueError(f"the exact Gauss-Newton operator needs the training set as ONE batch "
                         f"(ChunkAveraging is the mean over batches), got {len(data)} batches")


class ExactGNCg(CgInfluence):
    """pyDVL's CgInfluence on the damped mean Gauss-Newton matrix G/n + lambda I of the real loss.

    Overrides of ``_create_block`` (otherwise pyDVL's own code path for
    ``SecondOrderMode.GAUSS_NEWTON``, without preconditioner):
    * the operator's loss is the pseudo-loss of :func:`gn_pseudo_loss` (pyDVL's GAUSS_NEWTON mode
      squares gradients of the REAL loss: the empirical Fisher, weights l'^2 instead of l'');
      the gradient provider of the scores keeps the real loss;
    * the operator's ``averaging`` is ``ChunkAveraging`` instead of pyDVL 0.10.0's
      ``PointAveraging``, which divides the one-batch result by the leading size of the
      right-hand-side block (k, or P for a vector) instead of the number of data points. The
      batch operation already divides by |b|, so with ONE batch ChunkAveraging (sum over batches
      / number of batches = 1) is exact (checked in test_pydvl.py::test_exact_gauss_newton_operator)."""

    def __init__(self, model, loss, pseudo_loss, **kwargs):
        super().__init__(model, loss, **kwargs)
        self.pseudo_loss = pseudo_loss

    def _create_block(self, block_params, data, regularization):
        one_batch(data)
        op = GaussNewtonOperator(self.model, self.pseudo_loss, data, restrict_to=block_params)
        op.averaging = ChunkAveraging()             # pyDVL's PointAveraging divides by k
        cg_op = CgOperator(op, regularization, rtol=self.rtol, atol=self.atol,
                           maxiter=self.maxiter, progress=self.progress,
                           use_block_cg=self.solve_simultaneously,
                           warn_on_max_iteration=self.warn_on_max_iteration)
        gp = TorchGradientProvider(self.model, self.loss, restrict_to=block_params)
        return TorchOperatorGradientComposition(cg_op, gp)


class ExactGNLissa(LissaInfluence):
    """pyDVL's LissaInfluence on G/n + lambda I. One override of ``_create_block``: the
    Gauss-Newton batch operation gets the pseudo-loss of :func:`gn_pseudo_loss` instead of the
    real loss (pyDVL's GAUSS_NEWTON mode = empirical Fisher); the scores' gradients keep the real
    loss. LissaOperator applies the batch operation directly (no averaging bug); with the whole
    training set as one batch every step uses the full-batch G/n, like fimoda's default."""

    def __init__(self, model, loss, pseudo_loss, **kwargs):
        super().__init__(model, loss, **kwargs)
        self.pseudo_loss = pseudo_loss

    def _create_block(self, block_params, data, regularization):
        one_batch(data)
        batch_op = GaussNewtonBatchOperation(self.model, self.pseudo_loss,
                                             restrict_to=block_params)
        lissa_op = LissaOperator(batch_op, data, regularization, maxiter=self.maxiter,
                                 dampen=self.dampen, scale=self.scale, rtol=self.rtol,
                                 progress=self.progress,
                                 warn_on_max_iteration=self.warn_on_max_iteration)
        gp = TorchGradientProvider(self.model, self.loss, restrict_to=block_params)
        return TorchOperatorGradientComposition(lissa_op, gp)
