"""EK-FAC (george2018ekfac; grosse2023studyingllmgen): (12) with a layer-block, Kronecker-factored,
eigenvalue-corrected Gauss-Newton.

Attributed parameters: the weight (and, if it is among ``problem.names``, the bias) of every
``nn.Linear`` and ``nn.Conv2d`` module whose weight is among ``problem.names``. Every other
parameter (BatchNorm / LayerNorm affine, embeddings, ...) is excluded: its gradient block is not
used, i.e. its contribution to the score is zero. A bias enters through a homogeneous coordinate:
layer l's parameters form the matrix W_l = [weight | bias] (out x in'), in' = in (+1), with the
convolution weight flattened to (out, C kh kw) in ``F.unfold``'s order.

Per example n and position t (a token of a sequence, a patch of a convolution; t is the only
position for a plain MLP) a layer sees an input a_{n,t} (in', with a trailing 1 for a bias) and
produces a pre-activation s_{n,t}. The Gauss-Newton of the SUM risk is G = sum_n l''_n grad f_n
grad f_n^T, i.e. the outer products of the pseudo-gradients sqrt(l''_n) grad f_n; for layer l

    DW_n = sum_t ds_{n,t} a_{n,t}^T,   ds_{n,t} = sqrt(l''_n) d f_n / d s_{n,t},
    G_l  = sum_n vec(DW_n) vec(DW_n)^T                                  (exact layer block)
    A    = sum_{n,t} a a^T = Q_A diag(.) Q_A^T,   S = sum_{n,t} ds ds^T = Q_S diag(.) Q_S^T
    Lambda_ij = sum_n ((Q_S^T DW_n Q_A)_ij)^2                              (eigenvalue correction)

so G_l ~ (Q_S (x) Q_A) diag(vec Lambda) (Q_S (x) Q_A)^T, exact on its diagonal in the Kronecker
eigenbasis (KFE), and exact whenever G_l is diagonal there (e.g. one training example and one
position). The score (12) is

    scores[j, i] = sum_l < Q_S^T T_{j,l} Q_A / (Lambda_l + lambda),  Q_S^T V_{i,l} Q_A >

with T_{j,l}, V_{i,l} the layer-l loss gradients of test z_j and left-out z_i; equivalently
grad_l g(z_j)^T Q_S[(Q_S^T V Q_A) / (Lambda + lambda)]Q_A^T. Factors are fitted once
(:func:`fit_ekfac`, two passes over the training set with forward hooks); scores are per query.
Neither step forms a per-example gradient of the whole model: every per-example quantity comes
layer by layer from the (a, ds) of batched forward/backward passes (:func:`_passes`), rotated
into the eigenbasis from its positions, sum_t (Q_S^T ds_t)(Q_A^T a_t)^T, where that is cheaper
than forming DW_n (:func:`rotated`).

The paper ran kronfluence with its defaults: factors averaged (not summed) over the data, labels
sampled from the model's predictive (the "true Fisher", equal to this Gauss-Newton in
expectation), damping 1e-8 on the averaged factors, i.e. ``damping=1e-8 * n`` here.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..losses import gn_output, loss_derivatives
from ..memory import kept_rows, rotation_rows
from ..progress import progress_bar
from .common import DAMPING_GRID, DAMPING_INDEX, Attributor, damping_value
from .cost import EKFAC_TEST_ROW, ekfac_cost
from .specs import DAMPING, MethodSpec

DAMPING_MODES = ("lambda_G", "heuristic")


@dataclass(frozen=True)
class EkfacConfig:
    """EK-FAC's settings: the damping lambda added to the eigenvalues of the layer blocks."""
    damping_grid: tuple = DAMPING_GRID  # multiples of lambda_G; lambda = lambda_G x grid[index]
    damping_index: int = DAMPING_INDEX  # which multiple (the paper's: the largest)
    damping: Optional[float] = None   # absolute lambda; overrides the grid.
    #  kronfluence's default (damping_factor=1e-8 on MEAN factors) is damping=1e-8, risk="mean".
    damping_mode: str = "lambda_G"    # lambda_G: as above | heuristic: 0.1 mean(Lambda_l) per layer
    risk: str = "mean"                # lambda is added to the GN of the mean loss (as CG/LiSSA,
    #  torch-influence); "sum": to the GN of the summed risk (scores scale by n, lambda by 1/n)
    batch_size: int = 64              # training examples per forward/backward in the factor fit


@dataclass
class LayerFactors:
    """The EK-FAC factors of one layer (float64)."""
    module: str                 # module name
    kind: str                   # linear | conv
    weight: str                 # parameter names
    bias: Optional[str]
    shape: tuple                # (out, in') of W_l = [weight | bias]
    Q_A: torch.Tensor           # (in', in') eigenvectors of A
    Q_S: torch.Tensor           # (out, out) eigenvectors of S
    Lambda: torch.Tensor        # (out, in') corrected eigenvalues


@dataclass
class EkfacFactors:
    layers: list = field(default_factory=list)
    n: int = 0                  # training instances the factors sum over


def kfac_layers(problem):
    """Attributed (module name, module, weight name, bias name or None), in model order."""
    names = set(problem.names)
    out = []
    for mname, mod in problem.model.named_modules():
        if not isinstance(mod, (nn.Linear, nn.Conv2d)):
            continue
        w = f"{mname}.weight" if mname else "weight"
        b = f"{mname}.bias" if mname else "bias"
        if w not in names:
            continue
        if isinstance(mod, nn.Conv2d):
            if mod.groups != 1:
                raise ValueError(f"EK-FAC: Conv2d {mname!r} has groups={mod.groups}; "
                                 "only groups=1 is supported")
            if mod.padding_mode != "zeros":
                raise ValueError(f"EK-FAC: Conv2d {mname!r} has padding_mode="
                                 f"{mod.padding_mode!r}; only 'zeros' is supported")
            if isinstance(mod.padding, str) and mod.padding != "valid":
                raise ValueError(f"EK-FAC: Conv2d {mname!r} has padding={mod.padding!r}; "
                                 "give explicit integer padding")
        out.append((mname, mod, w, b if (mod.bias is not None and b in names) else None))
    if not out:
        raise ValueError("EK-FAC needs at least one nn.Linear or nn.Conv2d layer whose weight is "
                         f"among the attributed parameters; got {list(problem.names)}")
    return out


def _patches(mod, a: torch.Tensor, ds: torch.Tensor, bias: bool):
    """(a, ds) as (B, T, in') and (B, T, out): positions t flattened, a 1 appended for a bias."""
    B = a.shape[0]
    if isinstance(mod, nn.Conv2d):
        pad = 0 if isinstance(mod.padding, str) else mod.padding
        a = F.unfold(a, mod.kernel_size, dilation=mod.dilation, padding=pad,
                     stride=mod.stride).transpose(1, 2)                   # (B, T, C kh kw)
        ds = ds.reshape(B, ds.shape[1], -1).transpose(1, 2)               # (B, T, out)
    else:
        a = a.reshape(B, -1, a.shape[-1])
        ds = ds.reshape(B, -1, ds.shape[-1])
    if bias:
        a = torch.cat([a, torch.ones_like(a[..., :1])], dim=-1)
    return a, ds


def _passes(problem, layers, batch_size: int, desc: str, consume, X=None, Y=None,
            target: str = "pseudo") -> None:
    """One pass over the rows of (X, Y) (default: the training set) in batches of
    ``batch_size``: ``consume(rows, l, a, ds)`` for every layer l of every batch (``rows`` the
    batch's slice of X; a, ds as in :func:`_patches`), ds the derivative by the layer's output s
    of target="pseudo": sum_n sqrt(l''_n) f_n, the Gauss-Newton pseudo-gradients, or
    target="loss": sum_n L(z_n), the loss gradients. The examples of a batch are independent,
    so one backward pass gives every example's own ds. Each layer is consumed from a hook on its
    output as the backward pass reaches it, so one layer's (a, ds) at a time is alive beside the
    pass's own activations (a layer the loss does not reach gets ds = 0 after the pass)."""
    seen = {}                           # layer -> (its input, its output's shape) this batch
    reached = set()                     # layers whose ds the backward pass has given

    def hook(l, name, bias):
        def fn(mod, inputs, output):
            if l in seen:
                raise ValueError(f"EK-FAC: module {name!r} is called more than once per forward "
                                 "pass (shared weights are not supported)")
            a = inputs[0].detach()
            seen[l] = (a, output.shape)

            def on_grad(g):
                reached.add(l)
                consume(rows, l, *_patches(mod, a, g.detach(), bias))
            # a hook registered before any in-place op on the output gets the gradient by the
            # output as the layer made it (torch's rule for hooks and in-place ops)
            output.register_hook(on_grad)
        return fn

    problem.require_gauss_newton()      # the factors are of the Gauss-Newton (Fisher) form
    X, Y = (problem.X, problem.Y) if X is None else (X, Y)
    handles = [mod.register_forward_hook(hook(l, m, b is not None))
               for l, (m, mod, _, b) in enumerate(layers)]
    params = {k: v.detach().requires_grad_(True) for k, v in problem.params.items()}
    weights = [params[w] for _, _, w, _ in layers]
    n = len(X)
    it = range(0, n, batch_size)
    if desc and problem.progress and n > batch_size:
        it = progress_bar(it, desc=desc, total=(n + batch_size - 1) // batch_size, leave=False)
    try:
        for s in it:
            rows = slice(s, s + batch_size)
            x, y = problem.trim(X[rows]), Y[rows]
            seen.clear()
            reached.clear()
            with torch.enable_grad():
                if target == "loss":
                    total = problem.loss(params, x, y).sum()
                else:
                    f = gn_output(problem.out(params, x), y, problem.task)
                    _, d2 = loss_derivatives(f.detach(), y, problem.task)
                    # backprop sqrt(l''_n) through f_n: the GN pseudo-gradients
                    total = (d2.clamp_min(0).sqrt() * f).sum()
                missing = [m for l, (m, _, _, _) in enumerate(layers) if l not in seen]
                if missing:
                    raise ValueError(f"EK-FAC: layers {missing} are not called as modules in the "
                                     "forward pass (e.g. their weight is used functionally)")
                # the backward pass that fires the hooks (every factored layer's output lies
                # between the loss and its own weight); the weights' gradients are dropped
                torch.autograd.grad(total, weights, allow_unused=True)
            for l, (_, mod, _, b) in enumerate(layers):
                if l not in reached:                      # the loss does not depend on it
                    a, shape = seen[l]
                    consume(rows, l, *_patches(mod, a, a.new_zeros(shape), b is not None))
            seen.clear()
    finally:
        for h in handles:
            h.remove()


def positions_first(T: int, out: int, inp: int) -> bool:
    """Whether rotating the T positions' (a, ds) costs fewer multiply-adds,
    T (in'^2 + out^2 + out in'), than forming DW_n and rotating it, T out in' + out in' (out + in')
    (a token sequence or an MLP's single position: yes; a convolution's many patches: no)."""
    return T * (inp * inp + out * out + out * inp) < T * out * inp + out * inp * (out + inp)


def rotated(a: torch.Tensor, ds: torch.Tensor, Q_A: torch.Tensor, Q_S: torch.Tensor,
            first: Optional[bool] = None) -> torch.Tensor:
    """Every example's layer gradient in the Kronecker eigenbasis, (B, out, in'):

        Q_S^T DW_n Q_A = Q_S^T (sum_t ds_t a_t^T) Q_A = sum_t (Q_S^T ds_t)(Q_A^T a_t)^T,

    from the rotated positions or from DW_n, whichever is cheaper (:func:`positions_first`;
    ``first`` forces the choice). Never more than one layer of one batch."""
    qa, qs = Q_A.to(a.dtype), Q_S.to(ds.dtype)
    if first is None:
        first = positions_first(a.shape[1], ds.shape[-1], a.shape[-1])
    if first:
        return torch.einsum("bto,bti->boi", ds @ qs, a @ qa)
    return qs.T @ torch.einsum("bto,bti->boi", ds, a) @ qa


def rotated_blocks(a: torch.Tensor, ds: torch.Tensor, Q_A: torch.Tensor, Q_S: torch.Tensor,
                   memory: int):
    """``(rows, rotated(a[rows], ds[rows], Q_A, Q_S))`` over blocks of a batch's examples
    small enough for the memory budget (:func:`fimoda.memory.rotation_rows`)."""
    step = rotation_rows(memory, ds.shape[-1] * a.shape[-1], a.dtype)
    for s in range(0, len(a), step):
        yield slice(s, s + step), rotated(a[s:s + step], ds[s:s + step], Q_A, Q_S)


def fit_ekfac(problem, batch_size: int = 64) -> EkfacFactors:
    """Computed once: A, S and their eigenvectors (pass 1), then the eigenvalue correction
    Lambda_ij = sum_n ((Q_S^T DW_n Q_A)_ij)^2 over the n training instances (pass 2)."""
    if batch_size < 1:
        raise ValueError(f"EK-FAC batch_size must be >= 1, got {batch_size!r}")
    layers = kfac_layers(problem)
    dev, f64 = problem.device, torch.float64
    if len(problem.X) == 0:
        raise ValueError("EK-FAC: the training set is empty")
    A = [0.0] * len(layers)
    S = [0.0] * len(layers)

    def covariances(rows, l, a, ds):
        A[l] = A[l] + torch.einsum("bti,btj->ij", a, a).to(f64)
        S[l] = S[l] + torch.einsum("bto,btp->op", ds, ds).to(f64)
    _passes(problem, layers, batch_size, "EK-FAC: covariances", covariances)
    Q_A = [torch.linalg.eigh(0.5 * (M + M.T))[1] for M in A]
    Q_S = [torch.linalg.eigh(0.5 * (M + M.T))[1] for M in S]
    del A, S
    Lam = [torch.zeros(qs.shape[0], qa.shape[0], dtype=f64, device=dev)
           for qa, qs in zip(Q_A, Q_S)]

    def correction(rows, l, a, ds):
        for _, r in rotated_blocks(a, ds, Q_A[l], Q_S[l], problem.memory):
            Lam[l] += (r ** 2).sum(0).to(f64)
    _passes(problem, layers, batch_size, "EK-FAC: eigenvalue correction", correction)
    factors = EkfacFactors(n=len(problem.X))
    for (m, mod, w, b), qa, qs, lam in zip(layers, Q_A, Q_S, Lam):
        factors.layers.append(LayerFactors(
            module=m, kind="conv" if isinstance(mod, nn.Conv2d) else "linear", weight=w, bias=b,
            shape=tuple(lam.shape), Q_A=qa, Q_S=qs, Lambda=lam))
    return factors


def ekfac(att: Attributor, cfg: EkfacConfig = EkfacConfig(),
          factors: Optional[EkfacFactors] = None) -> np.ndarray:
    """(12) with the EK-FAC layer blocks (module docstring):

        scores[j, i] = sum_l grad_l g(z_j)^T Q_S [(Q_S^T V_{i,l} Q_A) / (Lambda_l + lambda)] Q_A^T,

    V_{i,l} = grad_l L(z_i) as a matrix; lambda = cfg.damping, or lambda_G * damping_grid[index]
    (``damping_mode="lambda_G"``), or 0.1 * mean(Lambda_l) per layer (``"heuristic"``).
    ``factors``: from :func:`fit_ekfac` (if not given: fitted once per Attributor and batch size,
    kept in ``att.fitted["ekfac"]``, and reused: a damping sweep fits them once).
    """
    if cfg.damping_mode not in DAMPING_MODES:
        raise ValueError(f"EK-FAC damping_mode must be one of {DAMPING_MODES}, "
                         f"got {cfg.damping_mode!r}")
    problem = att.problem
    if cfg.damping is None and cfg.damping_mode == "lambda_G" \
            and not -len(cfg.damping_grid) <= cfg.damping_index < len(cfg.damping_grid):
        raise ValueError(f"EK-FAC damping_index {cfg.damping_index} is outside damping_grid "
                         f"{cfg.damping_grid}")
    if cfg.risk not in ("mean", "sum"):
        raise ValueError(f"EK-FAC risk must be 'mean' or 'sum', got {cfg.risk!r}")
    if cfg.damping_mode == "lambda_G" or cfg.damping is not None:
        lam = damping_value(att, cfg.damping_grid, cfg.damping_index, cfg.damping)
        if not lam > 0:
            raise ValueError(f"EK-FAC damping must be > 0, got {lam!r}")
    if factors is None:
        cache = att.fitted.setdefault("ekfac", {})
        if cfg.batch_size not in cache:
            cache[cfg.batch_size] = fit_ekfac(problem, cfg.batch_size)
        factors = cache[cfg.batch_size]
    per = float(factors.n) if cfg.risk == "mean" else 1.0   # eigenvalues of G/n or of G
    live = [lf for lf in factors.layers if float(lf.Lambda.max()) > 0]   # others: zero GN block
    damp = {}
    for lf in live:
        if cfg.damping_mode == "heuristic" and cfg.damping is None:
            damp[lf.module] = 0.1 * float(lf.Lambda.mean()) / per
            if not damp[lf.module] > 0:
                raise ValueError(f"EK-FAC heuristic damping is 0 for layer {lf.module!r}")
        else:
            damp[lf.module] = lam

    if not live:
        return np.zeros((len(att.X_test), len(att.X_loo)))
    found = {layer[0]: layer for layer in kfac_layers(problem)}
    layers = [found[lf.module] for lf in live]
    inv = [1.0 / (lf.Lambda / per + damp[lf.module]) for lf in live]    # (out, in') float64
    dtype, bs = problem.dtype, cfg.batch_size
    scores = torch.zeros(len(att.X_test), len(att.X_loo), dtype=dtype, device=problem.device)
    # Per-example layer gradients come from batched passes (:func:`_passes`, target "loss"),
    # never as whole gradient rows: a block of test rows is rotated into the eigenbasis and
    # divided by the damped eigenvalues, kept while the left-out rows stream past it, each
    # left-out batch rotated one layer at a time and dotted with the block
    step = kept_rows(problem.memory, sum(lf.Lambda.numel() for lf in live), dtype,
                     EKFAC_TEST_ROW)
    for t0 in range(0, len(att.X_test), step):
        ts = slice(t0, t0 + step)
        Xt, Yt = att.X_test[ts], att.Y_test[ts]
        R = [torch.empty(len(Yt), *lf.shape, dtype=dtype, device=problem.device) for lf in live]

        def test_side(rows, l, a, ds):
            for b, r in rotated_blocks(a, ds, live[l].Q_A, live[l].Q_S, problem.memory):
                R[l][rows][b] = r * inv[l].to(dtype)

        def left_side(rows, l, a, ds):
            out = scores[ts, rows]                                     # a view
            for b, V in rotated_blocks(a, ds, live[l].Q_A, live[l].Q_S, problem.memory):
                out[:, b] += R[l].flatten(1) @ V.flatten(1).T
        _passes(problem, layers, bs, "EK-FAC: test gradients", test_side, Xt, Yt, "loss")
        _passes(problem, layers, bs, "EK-FAC: left-out gradients", left_side, att.X_loo,
                att.Y_loo, "loss")
        del R
    return scores.to(torch.float64).cpu().numpy()


SPECS = (MethodSpec("ekfac", ekfac, EkfacConfig, "(12) with layer-block EK-FAC", figure2=8,
                    shared=DAMPING, cost=lambda shape, cfg: ekfac_cost("ekfac", shape, cfg)),)
