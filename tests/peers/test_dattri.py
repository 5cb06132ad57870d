"""fimoda vs dattri (dattri.algorithm) on the same float64 model.

dattri's influence attributors take a ``loss_func(params, (x, y))`` (torch.func style); the
Hessian is that of ``loss_func`` on a whole ``full_train_dataloader`` batch, and
``transform_test_rep`` SUMS the per-batch inverse-Hessian products over the loader's batches, so
the training set is passed as ONE batch. Our ``loss_func`` is the batch MEAN (as pyDVL), hence
``regularization`` = lambda_mean and fimoda runs with ``risk="mean"``.
``attribute(train_loader, test_loader)`` returns (n', T) = grad L(train)^T (H + reg I)^{-1}
grad L(test) — fimoda's eq. (8) sign; we transpose.

dattri's LiSSA collate function casts every data tensor to float32 (``.float()``); our
``loss_func`` casts x back to float64 (the inputs are then rounded to float32, a relative change
of ~1e-8 of the Hessian) and y to its training dtype.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch.func import functional_call
from torch.utils.data import DataLoader, TensorDataset

pytest.importorskip("dattri", reason="dattri is not installed (bash tests/peers/run.sh)")
from dattri.algorithm.influence_function import (  # noqa: E402
    IFAttributorCG, IFAttributorDataInf, IFAttributorExplicit, IFAttributorLiSSA)
from dattri.algorithm.trak import TRAKAttributor  # noqa: E402
from dattri.task import AttributionTask  # noqa: E402

from fimoda.losses import gn_output, loss_derivatives  # noqa: E402


def _loader(X, Y):
    return DataLoader(TensorDataset(X, Y), batch_size=len(X), shuffle=False)


def _task(setup, model=None):
    model = setup.model if model is None else model

    def loss_func(params, data):
        x, y = data
        out = functional_call(model, params, (x.to(torch.float64),))
        return setup.loss_mean(out, y.to(setup.Y.dtype))
    return AttributionTask(loss_func=loss_func, model=model, checkpoints=model.state_dict())


def _attribute(peer, setup, attributor):
    def run():
        attributor.cache(_loader(setup.X, setup.Y))
        return attributor.attribute(_loader(setup.X_loo, setup.Y_loo),
                                    _loader(setup.X_test, setup.Y_test)).T
    return peer.timed(run)


def test_explicit_vs_dense_true_hessian(peer, setup):
    att = IFAttributorExplicit(_task(setup), regularization=setup.lam_mean)
    theirs, t_peer = _attribute(peer, setup, att)
    mine, t_mine = peer.ours(setup, "dense", hessian="true", risk="mean", damping=setup.lam_mean)
    cos = peer.row_cosines(theirs, mine)
    ratio = peer.scale_ratio(theirs, mine)
    peer.record("dattri", "IFAttributorExplicit", "dense(true H)", setup.task, cos, t_peer,
                t_mine, ratio=ratio)
    assert cos.min() >= 0.999999
    assert ratio == pytest.approx(1.0, rel=1e-6)


def test_cg_vs_cg_true_hessian(peer, setup):
    """dattri's CG runs exactly ``max_iter`` steps from x_0 = b (its ``tol`` is accepted but
    unused); P + 30 steps converge on this P-dimensional problem."""
    P = sum(p.numel() for p in setup.model.parameters())
    att = IFAttributorCG(_task(setup), max_iter=P + 30, regularization=setup.lam_mean)
    theirs, t_peer = _attribute(peer, setup, att)
    assert torch.isfinite(theirs).all()
    mine, t_mine = peer.ours(setup, "cg", hessian="true", risk="mean", damping=setup.lam_mean,
                             tol=1e-10)
    cos = peer.row_cosines(theirs, mine)
    peer.record("dattri", "IFAttributorCG", "cg(true H)", setup.task, cos, t_peer, t_mine,
                ratio=peer.scale_ratio(theirs, mine), note=f"{P + 30} fixed steps")
    assert cos.min() >= 0.9999


def test_lissa_vs_lissa_h(peer, setup):
    """dattri: v <- b + (1 - d) v - H_B v / s, result v / s; with batch_size = n (B = the whole
    set, drawn by randperm) this is fimoda's full-batch recurrence with scale = s and
    lambda = s d."""
    lam_max = float(setup.eig[-1]) / setup.n + setup.lam_mean
    scale, depth = 0.6 * lam_max, 300
    att = IFAttributorLiSSA(_task(setup), batch_size=setup.n, num_repeat=1,
                            recursion_depth=depth, damping=setup.lam_mean / scale,
                            scaling=scale)
    theirs, t_peer = _attribute(peer, setup, att)
    mine, t_mine = peer.ours(setup, "lissa_h", risk="mean", damping=setup.lam_mean, scale=scale,
                             depth=depth)
    cos = peer.row_cosines(theirs, mine)
    peer.record("dattri", "IFAttributorLiSSA", "lissa_h", setup.task, cos, t_peer, t_mine,
                ratio=peer.scale_ratio(theirs, mine), note=f"depth {depth}; X rounded to fp32")
    assert cos.min() >= 0.9999


WEIGHTS = ["hidden.0.weight", "hidden.1.weight", "out.weight"]


def test_datainf(peer, setup):
    """DataInf (18) on the three weight matrices (biases not attributed). dattri groups the
    parameters of a MODULE into one layer and uses ONE regularization for every layer; fimoda
    treats each parameter tensor as a layer with its own lambda_l = mean(g_l^2) / c. With the
    weights only, modules and tensors coincide; dattri is run once per layer (the other
    parameters frozen) with regularization = fimoda's lambda_l, and the per-layer scores are
    summed: exactly fimoda's formula."""
    c = 10.0
    mine, t_mine = peer.ours(setup, "datainf", names=WEIGHTS, c_grid=(c,), c_index=0)
    att_f = setup.attributor(WEIGHTS)
    G = att_f.problem.loss_grads(setup.X, setup.Y)        # (n, P_weights), in WEIGHTS order
    sizes = [dict(setup.model.named_parameters())[w].numel() for w in WEIGHTS]
    lams = [float((g ** 2).mean()) / c for g in torch.split(G, sizes, dim=1)]

    def run():
        total = 0
        for w, lam in zip(WEIGHTS, lams):
            model = copy.deepcopy(setup.model)
            for name, p in model.named_parameters():
                p.requires_grad_(name == w)
            att = IFAttributorDataInf(_task(setup, model), regularization=lam)
            att.cache(_loader(setup.X, setup.Y))
            total = total + att.attribute(_loader(setup.X_loo, setup.Y_loo),
                                          _loader(setup.X_test, setup.Y_test)).T
        return total
    theirs, t_peer = peer.timed(run)
    cos = peer.row_cosines(theirs, mine)
    ratio = peer.scale_ratio(theirs, mine)
    peer.record("dattri", "IFAttributorDataInf", "datainf", setup.task, cos, t_peer, t_mine,
                ratio=ratio, note="weights only; per-layer runs summed")
    assert cos.min() >= 0.999999
    assert ratio == pytest.approx(1.0, rel=1e-6)


def test_trak(peer, setup):
    """TRAK_{M=1} with the Gauss-Newton output f (prediction / logit of p_y) as dattri's
    loss_func and target_func, Q_i = 1 - correct_probability = -l'_i (for regression the
    'probability' is 1 + l'_i = 1 + 2 (f_i - y_i)), projection dimension = P. dattri projects with
    a random Gaussian P x P matrix R; fimoda skips the projection (identity) for k >= P. For an
    invertible R and an invertible kernel Phi^T Phi the scores do not depend on R. With two
    logits the kernel is singular anyway (see below), so both sides add the same tiny ridge; its
    limit is R-independent for test gradients in the kernel's range (they are: the null space
    comes from symmetries and dead units, which every input shares)."""
    model = setup.model
    P = sum(p.numel() for p in model.parameters())

    def f_func(params, data):
        x, y = data
        out = functional_call(model, params, (x.unsqueeze(0).to(torch.float64),))
        return gn_output(out, y.unsqueeze(0), setup.task).sum()

    def correct_probability(params, data):
        x, y = data
        out = functional_call(model, params, (x.unsqueeze(0).to(torch.float64),))
        f = gn_output(out, y.unsqueeze(0), setup.task)
        d1, _ = loss_derivatives(f, y.unsqueeze(0), setup.task)
        return (1.0 + d1).sum()              # 1 - Q with Q = -l'

    # Phi^T Phi is singular for a ReLU MLP (each hidden unit's rescaling symmetry, dead units,
    # and with two logits the opposite output rows) and ill-conditioned on its range (down to
    # ~1e-11 x its top eigenvalue for a model like this one): both sides get the same explicit
    # ridge, 1e-15 x top, below the range's spectrum and above round-off. dattri adds it to
    # R^T K R / P, a different metric than fimoda's K: the gap grows with the ridge (regression:
    # 1 - cos = 8e-9 at 1e-15, 8e-7 at 1e-14, 8e-5 at 1e-13). fimoda's automatic ridge
    # (ridge=None: 1e-10 x top for a singular kernel) changes the scores visibly on
    # ill-conditioned kernels (1 - cos = 2.5e-4 here, 0.027 on a differently initialised model).
    phi = setup.attributor().problem.output_grads(setup.X, setup.Y)
    top = float(torch.linalg.eigvalsh(phi.T @ phi)[-1])
    ridge = 1e-15 * top

    def run():
        task = AttributionTask(loss_func=f_func, model=model, checkpoints=model.state_dict())
        att = TRAKAttributor(task, correct_probability_func=correct_probability,
                             projector_kwargs={"proj_dim": P, "proj_seed": 0, "device": "cpu"},
                             regularization=ridge)   # kernel R^T K R / P, R ~ N(0, 1): K's scale
        att.cache(_loader(setup.X, setup.Y))
        out = att.attribute(_loader(setup.X_test, setup.Y_test))     # (n, T): all training
        return out.T[:, setup.loo_index]                              # the left-out columns
    theirs, t_peer = peer.timed(run)
    mine, t_mine = peer.ours(setup, "trak", proj_dim=P, test_side="output", ridge=ridge)
    cos = peer.row_cosines(theirs, mine)
    peer.record("dattri", "TRAKAttributor", "trak", setup.task, cos, t_peer, t_mine,
                note=f"proj_dim = P = {P}; ridge 1e-15 x top")
    assert cos.min() >= 0.9999
