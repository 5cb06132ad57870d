"""fimoda vs pyDVL (pydvl.influence.torch) on the same float64 model.

pyDVL's Hessian is that of the MEAN batch loss (``hessian``: sum_b |b| H_b / n), its
``regularization`` is added to it, and ``influences(x_test, y_test, x, y, mode=Up)`` returns
grad L(test)^T (H_mean + reg I)^{-1} grad L(train) — the sign and formula of fimoda's eq. (8)
scores. With fimoda's ``risk="mean"`` and ``damping=reg`` both sides compute the same numbers
(scale ratio 1). The training set is one DataLoader batch (pyDVL's LiSSA then uses the full-batch
Hessian at every step, like fimoda's default ``batch_size=None``).

Gauss-Newton. pyDVL's own ``SecondOrderMode.GAUSS_NEWTON`` is the empirical Fisher (see
:func:`test_gauss_newton_mode_is_empirical_fisher`). :class:`ExactGNCg` / :class:`ExactGNLissa`
below make pyDVL's CG and LiSSA run on EXACTLY fimoda's matrix G/n + lambda I (eq. 12, mean risk):
pyDVL's Gauss-Newton operator (1/|b|) sum_i grad l~_i grad l~_i^T is given the pseudo-loss
l~_i = sqrt(l''_i) f_i (l'' at the detached f), whose outer product is l''_i grad f_i grad f_i^T,
while the gradients that enter the scores stay those of the real loss. The same construction is
used by benchmarks/methods_speed.py (both import it from tests/peers/pydvl_exact_gn.py).
"""
from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

pydvl_torch = pytest.importorskip("pydvl.influence.torch",
                                  reason="pyDVL is not installed (bash tests/peers/run.sh)")
from pydvl.influence import InfluenceMode  # noqa: E402
from pydvl.influence.torch.base import TorchBatch  # noqa: E402
from pydvl.influence.torch.batch_operation import ChunkAveraging  # noqa: E402
from pydvl.influence.torch.operator import GaussNewtonOperator  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402


logging.getLogger("pydvl").setLevel(logging.ERROR)


def _pydvl_scores(peer, setup, inf):
    loader = DataLoader(TensorDataset(setup.X, setup.Y), batch_size=setup.n)

    def run():
        fitted = inf.fit(loader)
        return fitted.influences(setup.X_test, setup.Y_test, setup.X_loo, setup.Y_loo,
                                 mode=InfluenceMode.Up)
    return peer.timed(run)


from pydvl_exact_gn import ExactGNCg, ExactGNLissa, gn_pseudo_loss  # noqa: E402


def _mean_gauss_newton(setup, att):
    """fimoda's G/n = Phi^T diag(l'') Phi / n, dense (P, P)."""
    phi, _, _, d2 = att.problem.gn_pieces(setup.X, setup.Y)
    return phi.T @ (d2[:, None] * phi) / setup.n


def test_direct_vs_dense_true_hessian(peer, setup):
    inf = pydvl_torch.DirectInfluence(setup.model, setup.loss_mean,
                                      regularization=setup.lam_mean)
    theirs, t_peer = _pydvl_scores(peer, setup, inf)
    mine, t_mine = peer.ours(setup, "dense", hessian="true", risk="mean", damping=setup.lam_mean)
    cos = peer.row_cosines(theirs, mine)
    ratio = peer.scale_ratio(theirs, mine)
    peer.record("pyDVL", "DirectInfluence", "dense(true H)", setup.task, cos, t_peer, t_mine,
           ratio=ratio)
    assert cos.min() >= 0.999999
    assert ratio == pytest.approx(1.0, rel=1e-6)
    np.testing.assert_allclose(theirs.detach().numpy(), mine, rtol=1e-6,
                               atol=1e-9 * np.abs(mine).max())


def test_cg_vs_cg_true_hessian(peer, setup):
    inf = pydvl_torch.CgInfluence(setup.model, setup.loss_mean, regularization=setup.lam_mean,
                                  rtol=1e-10, atol=1e-14, maxiter=2000)
    theirs, t_peer = _pydvl_scores(peer, setup, inf)
    mine, t_mine = peer.ours(setup, "cg", hessian="true", risk="mean", damping=setup.lam_mean,
                        tol=1e-10)
    cos = peer.row_cosines(theirs, mine)
    peer.record("pyDVL", "CgInfluence", "cg(true H)", setup.task, cos, t_peer, t_mine,
           ratio=peer.scale_ratio(theirs, mine))
    assert cos.min() >= 0.99999


def test_lissa_vs_lissa_h(peer, setup):
    """Same recurrence v <- b + (I - (H_mean + lam I)/scale) v, result v/scale, same depth and
    scale (pyDVL's ``dampen`` = 0, ``rtol`` = 0 so it never stops early): identical iterates. The
    run is far from converged for this ill-conditioned Hessian; the comparison is of the method."""
    lam_max = float(setup.eig[-1]) / setup.n + setup.lam_mean
    scale, depth = 0.6 * lam_max, 300       # scale > lam_max / 2: convergent
    inf = pydvl_torch.LissaInfluence(setup.model, setup.loss_mean,
                                     regularization=setup.lam_mean, maxiter=depth,
                                     scale=scale, dampen=0.0, rtol=0.0,
                                     warn_on_max_iteration=False)
    theirs, t_peer = _pydvl_scores(peer, setup, inf)
    mine, t_mine = peer.ours(setup, "lissa_h", risk="mean", damping=setup.lam_mean, scale=scale,
                        depth=depth)
    cos = peer.row_cosines(theirs, mine)
    peer.record("pyDVL", "LissaInfluence", "lissa_h", setup.task, cos, t_peer, t_mine,
           ratio=peer.scale_ratio(theirs, mine), note=f"depth {depth}, scale {scale:.3g}")
    assert cos.min() >= 0.99999


def test_arnoldi_vs_arnoldi(peer, setup):
    """Top-k (largest |eigenvalue|) eigenpairs of H_mean, (H + lam)^{-1} ~ U (D + lam)^{-1} U^T.
    pyDVL: ARPACK (implicitly restarted Lanczos) to tol 1e-10; fimoda: Arnoldi with m = P steps
    (the exact spectrum). Both keep the same k eigenpairs, so the scores agree."""
    rank = 30
    inf = pydvl_torch.ArnoldiInfluence(setup.model, setup.loss_mean,
                                       regularization=setup.lam_mean, rank=rank, tol=1e-10)
    theirs, t_peer = _pydvl_scores(peer, setup, inf)
    mine, t_mine = peer.ours(setup, "arnoldi", risk="mean", damping=setup.lam_mean, rank=rank,
                        n_iter=10_000)
    cos = peer.row_cosines(theirs, mine)
    peer.record("pyDVL", "ArnoldiInfluence", "arnoldi", setup.task, cos, t_peer, t_mine,
           ratio=peer.scale_ratio(theirs, mine), note=f"rank {rank}")
    assert cos.min() >= 0.9999


def test_gauss_newton_mode_is_empirical_fisher(peer, setup):
    """pyDVL's ``SecondOrderMode.GAUSS_NEWTON`` is the EMPIRICAL Fisher
    EF = (1/n) sum_i grad L_i grad L_i^T (as its docstring says), not the Gauss-Newton matrix
    G = (1/n) sum_i l''_i grad f_i grad f_i^T of fimoda's eq. (12): the per-example weights are
    l'_i^2 vs l''_i. Checked three ways: pyDVL's batch operation is EF v; its LiSSA in that mode
    equals the LiSSA recurrence on EF computed densely here (from fimoda's per-example gradients);
    and that LiSSA is NOT fimoda's Gauss-Newton LiSSA (reported, cosine < 0.9999).

    Also documented: pyDVL 0.10.0's GaussNewtonOperator (behind CgInfluence / ArnoldiInfluence
    in this mode) averages with ``PointAveraging``, which divides by the first tensor's leading
    size — the number of right-hand sides k (or P for a single vector) instead of the number of
    data points — so it applies EF / k; and DirectInfluence's ``gauss_newton`` divides by 0 for a
    single batch. Only LissaInfluence gives EF in this mode."""
    from pydvl.influence.torch.base import TorchBatch
    from pydvl.influence.torch.batch_operation import GaussNewtonBatchOperation
    from pydvl.influence.torch.influence_function_model import SecondOrderMode
    from pydvl.influence.torch.operator import GaussNewtonOperator
    att = setup.attributor()
    Gtr = att.problem.loss_grads(setup.X, setup.Y)                      # (n, P)
    P = Gtr.shape[1]
    EF = Gtr.T @ Gtr / setup.n
    V = torch.randn(3, P, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    op = GaussNewtonBatchOperation(setup.model, setup.loss_mean)
    assert torch.allclose(op.apply(TorchBatch(setup.X, setup.Y), V), V @ EF,
                          rtol=1e-10, atol=1e-12 * float((V @ EF).abs().max()))
    loader = DataLoader(TensorDataset(setup.X, setup.Y), batch_size=setup.n)
    avg = GaussNewtonOperator(setup.model, setup.loss_mean, loader)
    assert torch.allclose(avg.apply(V), V @ EF / 3, rtol=1e-10,
                          atol=1e-12 * float((V @ EF).abs().max()))          # the 1/k bug

    lam = setup.lam_mean
    phi, _, _, d2 = att.problem.gn_pieces(setup.X, setup.Y)
    GN = phi.T @ (d2[:, None] * phi) / setup.n
    top = max(float(torch.linalg.eigvalsh(EF)[-1]), float(torch.linalg.eigvalsh(GN)[-1]))
    scale = 0.6 * (top + lam)                     # convergent for both matrices
    depth = 300
    inf = pydvl_torch.LissaInfluence(setup.model, setup.loss_mean, regularization=lam,
                                     maxiter=depth, scale=scale, rtol=0.0,
                                     warn_on_max_iteration=False,
                                     second_order_mode=SecondOrderMode.GAUSS_NEWTON)
    theirs, t_peer = _pydvl_scores(peer, setup, inf)
    A = EF + lam * torch.eye(P)
    B = att.test_grads.T                                                # pyDVL solves T <= n'
    Vt = B.clone()
    for _ in range(depth):
        Vt = B + Vt - A @ Vt / scale
    ref = (Vt / scale).T @ att.train_grads.T
    cos_ef = peer.row_cosines(theirs, ref)
    assert cos_ef.min() >= 0.999999
    mine, t_mine = peer.ours(setup, "lissa", risk="mean", damping=lam, scale=scale, depth=depth)
    cos = peer.row_cosines(theirs, mine)
    peer.record("pyDVL", "Lissa(GAUSS_NEWTON)", "lissa (GN)", setup.task, cos, t_peer, t_mine,
                note=f"pyDVL 'GN' = empirical Fisher (cos to EF recurrence {cos_ef.min():.7f})")
    assert cos.min() < 0.9999


def test_exact_gauss_newton_operator(setup):
    """The operators inside ExactGNCg / ExactGNLissa (after ``fit``) are fimoda's G/n, dense check
    on 3 random vectors as a block and on one vector alone; and the averaging claim: pyDVL's
    PointAveraging gives (G/n) / k on a k-column block, ChunkAveraging exactly G/n for one batch."""
    att = setup.attributor()
    GN = _mean_gauss_newton(setup, att)
    P = GN.shape[0]
    V = torch.randn(3, P, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ref = V @ GN
    atol = 1e-12 * float(ref.abs().max())
    loader = DataLoader(TensorDataset(setup.X, setup.Y), batch_size=setup.n)
    pseudo = gn_pseudo_loss(setup.task)

    point = GaussNewtonOperator(setup.model, pseudo, loader)         # pyDVL as shipped
    assert torch.allclose(point.apply(V), ref / 3, rtol=1e-10, atol=atol)
    chunk = GaussNewtonOperator(setup.model, pseudo, loader)
    chunk.averaging = ChunkAveraging()
    assert torch.allclose(chunk.apply(V), ref, rtol=1e-10, atol=atol)
    assert torch.allclose(chunk.apply(V[0]), ref[0], rtol=1e-10, atol=atol)

    cg = ExactGNCg(setup.model, setup.loss_mean, pseudo, regularization=setup.lam_mean,
                   solve_simultaneously=True).fit(loader)
    (block,) = cg.block_mapper.composable_block_dict.values()
    assert torch.allclose(block.op.operator.apply(V), ref, rtol=1e-10, atol=atol)
    lissa = ExactGNLissa(setup.model, setup.loss_mean, pseudo,
                         regularization=setup.lam_mean).fit(loader)
    (block,) = lissa.block_mapper.composable_block_dict.values()
    assert torch.allclose(block.op.batch_operation.apply(TorchBatch(setup.X, setup.Y), V), ref,
                          rtol=1e-10, atol=atol)
    # the scores' gradients are of the real loss (fimoda's left-out loss gradients)
    assert torch.allclose(block.gp.flat_grads(TorchBatch(setup.X_loo, setup.Y_loo)),
                          att.train_grads, rtol=1e-10, atol=1e-14)
    with pytest.raises(ValueError, match="ONE batch"):
        ExactGNCg(setup.model, setup.loss_mean, pseudo).fit(
            DataLoader(TensorDataset(setup.X, setup.Y), batch_size=setup.n // 2))


def test_cg_vs_cg_gauss_newton(peer, setup):
    """Block CG on the same matrix G/n + lambda I: pyDVL (ExactGNCg, rtol = sqrt(tol): it stops at
    ||r|| < rtol^2 ||b||) and fimoda cg (Gauss-Newton, risk="mean"), both to relative residual
    1e-10: the same scores."""
    tol = 1e-10
    inf = ExactGNCg(setup.model, setup.loss_mean, gn_pseudo_loss(setup.task),
                    regularization=setup.lam_mean, rtol=tol ** 0.5, atol=0.0, maxiter=2000,
                    solve_simultaneously=True)
    theirs, t_peer = _pydvl_scores(peer, setup, inf)
    mine, t_mine = peer.ours(setup, "cg", risk="mean", damping=setup.lam_mean, tol=tol)
    cos = peer.row_cosines(theirs, mine)
    ratio = peer.scale_ratio(theirs, mine)
    peer.record("pyDVL", "Cg (exact GN, block)", "cg (GN)", setup.task, cos, t_peer, t_mine,
                ratio=ratio, note="pseudo-loss operator, ChunkAveraging")
    assert cos.min() >= 0.999999
    assert ratio == pytest.approx(1.0, rel=1e-6)


def test_lissa_vs_lissa_gauss_newton(peer, setup):
    """LiSSA on the same matrix G/n + lambda I, same scale (0.6 (lambda_max + lambda), convergent)
    and depth, pyDVL never stopping early (rtol 0, dampen 0): the same recurrence, the same
    scores."""
    att = setup.attributor()
    lam = setup.lam_mean
    top = float(torch.linalg.eigvalsh(_mean_gauss_newton(setup, att))[-1])
    scale, depth = 0.6 * (top + lam), 300
    inf = ExactGNLissa(setup.model, setup.loss_mean, gn_pseudo_loss(setup.task),
                       regularization=lam, maxiter=depth, scale=scale, dampen=0.0, rtol=0.0,
                       warn_on_max_iteration=False)
    theirs, t_peer = _pydvl_scores(peer, setup, inf)
    mine, t_mine = peer.ours(setup, "lissa", risk="mean", damping=lam, scale=scale, depth=depth)
    cos = peer.row_cosines(theirs, mine)
    ratio = peer.scale_ratio(theirs, mine)
    peer.record("pyDVL", "Lissa (exact GN)", "lissa (GN)", setup.task, cos, t_peer, t_mine,
                ratio=ratio, note=f"depth {depth}, scale {scale:.3g}")
    assert cos.min() >= 0.999999
    assert ratio == pytest.approx(1.0, rel=1e-6)


def _gn_output_layer_weights(setup):
    """Per-example weights of the output-layer curvature: fimoda's Gauss-Newton l''_n = p(1-p)
    and pyDVL's pseudo-loss sum_c sqrt(p_c) log p_c, whose logit gradient for two classes is
    sqrt(p1 p2)(sqrt(p2) - sqrt(p1)) (1, -1), i.e. weight p1 p2 (1 - 2 sqrt(p1 p2))."""
    with torch.no_grad():
        p = torch.softmax(setup.model(setup.X), dim=1)
    gn = p[:, 0] * p[:, 1]
    pydvl = gn * (1 - 2 * torch.sqrt(gn))
    return gn, pydvl


def test_ekfac_classification(peer, classification):
    """pyDVL's EkfacInfluence (cross-entropy only, so classification only) is NOT the Gauss-Newton
    EK-FAC: its curvature is built from ONE backward pass of sum_c sqrt(p_c) log p_c per example,
    whose outer product is (sum_c sqrt(p_c) g_c)(sum_c sqrt(p_c) g_c)^T, not the Fisher
    sum_c p_c g_c g_c^T (the cross terms do not vanish). For two classes this multiplies each
    example's curvature by 1 - 2 sqrt(p1 p2) (0 at p = 1/2). fimoda's ekfac uses l'' = p(1-p)
    exactly, so the two disagree by design; we check the per-example weight claim on pyDVL's
    own output-layer factor, and report the score cosine without asserting 0.99."""
    s = classification
    inf = pydvl_torch.EkfacInfluence(s.model, update_diagonal=True,
                                     hessian_regularization=s.lam_mean)
    theirs, t_peer = _pydvl_scores(peer, s, inf)
    mine, t_mine = peer.ours(s, "ekfac", risk="mean", damping=s.lam_mean)
    cos = peer.row_cosines(theirs, mine)
    peer.record("pyDVL", "EkfacInfluence", "ekfac", s.task, cos, t_peer, t_mine,
           note="pyDVL curvature != Gauss-Newton (see test docstring)")
    # pyDVL's output-layer gradient factor S (mean over examples) equals
    # mean_n w_n (1,-1)(1,-1)^T with w_n = p1 p2 (1 - 2 sqrt(p1 p2)), not with w_n = p1 p2.
    rep = inf.ekfac_representation
    evecs_g = list(rep.evecs_g)[-1]
    diag = list(rep.diags)[-1]                 # after update_diagonal: corrected eigenvalues
    assert evecs_g.shape == (2, 2)
    gn, pyd = _gn_output_layer_weights(s)
    with torch.no_grad():
        h = s.model.hidden[1](torch.relu(s.model.hidden[0](s.X))).relu()
    a = torch.cat([h, torch.ones(len(h), 1)], dim=1)
    u = torch.tensor([1.0, -1.0])

    def corrected(w):
        # Lambda_ij = mean_n w_n (q_S_i . u)^2 (q_A_j . a_n)^2 in pyDVL's eigenbasis
        evecs_a = list(rep.evecs_a)[-1]
        return torch.einsum("n,i,nj->ij", w, (evecs_g.T @ u) ** 2, (a @ evecs_a) ** 2) / len(w)

    d = diag.reshape(2, -1)
    assert torch.allclose(d, corrected(pyd), rtol=1e-8, atol=1e-12 * float(d.abs().max()))
    assert not torch.allclose(d, corrected(gn), rtol=1e-2)
