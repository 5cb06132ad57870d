"""The shared base of every gradient-based method: per-example gradients at theta^f, the
Gauss-Newton pieces, and Hessian-vector products of the full-data empirical risk.

Everything is functional (``torch.func``): a model is turned into ``f(params, x)`` with
``functional_call``; per-example quantities are ``vmap``-ed over chunks of the data. Gradients are
taken with respect to a chosen subset of parameter tensors (``names``; default: all), and returned
flattened in the order of ``names`` so that every method works with plain ``(N, P)`` matrices.

Conventions (``docs/equations.md``): the empirical risk R(D; theta) is a SUM of per-example
losses; the Gauss-Newton output f is the prediction for regression and the logit of the true
class's probability, f = log(p_y / (1 - p_y)), for classification, with l(f) = log(1 + e^{-f}).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
from torch.func import functional_call, grad, jvp, vjp, vmap
from .progress import progress_bar

from .losses import check_task, gn_output, loss_derivatives, loss_from_f
from .memory import chunk_rows, resolve_budget, solve_columns
from .models import input_trimmer, row_groups, vmappable
from .tensors import check_data


class CustomLossError(ValueError):
    """A method needs the Gauss-Newton form of the task's loss, and a custom loss was given."""


# ----------------------------------------------------------------------------- parameters
def param_names(model: torch.nn.Module, names: Optional[Sequence[str]] = None) -> list[str]:
    """The trainable parameter names to differentiate, validated against the model. A name may
    also be a module prefix (e.g. ``"out"`` selects ``out.weight`` and ``out.bias``)."""
    all_names = [n for n, p in model.named_parameters() if p.requires_grad]
    if names is None:
        return all_names
    chosen = []
    for want in names:
        hits = [n for n in all_names if n == want or n.startswith(want + ".")]
        if not hits:
            raise ValueError(f"no parameter named {want!r}; the model has {all_names}")
        chosen += [h for h in hits if h not in chosen]
    return chosen


def model_state(model: torch.nn.Module, names: Sequence[str]):
    """(params to differentiate, everything else: frozen params and buffers), detached."""
    params = {n: p.detach() for n, p in model.named_parameters() if n in names}
    rest = {n: p.detach() for n, p in model.named_parameters() if n not in names}
    rest.update({n: b.detach() for n, b in model.named_buffers()})
    return params, rest


def flatten(tensors: dict, names: Sequence[str], batched: bool = False) -> torch.Tensor:
    if batched:
        return torch.cat([tensors[n].reshape(tensors[n].shape[0], -1) for n in names], dim=1)
    return torch.cat([tensors[n].reshape(-1) for n in names])


def unflatten(vec: torch.Tensor, template: dict, names: Sequence[str]) -> dict:
    out, k = {}, 0
    for n in names:
        m = template[n].numel()
        out[n] = vec[k:k + m].view_as(template[n])
        k += m
    return out


def block_slices(template: dict, names: Sequence[str]) -> dict:
    """Slice of each parameter tensor in the flattened vector (for layer-wise methods)."""
    out, k = {}, 0
    for n in names:
        m = template[n].numel()
        out[n] = slice(k, k + m)
        k += m
    return out


# ----------------------------------------------------------------------------- the base object
@dataclass
class Problem:
    """A final model theta^f with its training data, seen as a function of chosen parameters.

    ``X, Y``: the full training set (needed by Hessian-vector products and factor fits).
    ``task``: "regression" | "classification". ``names``: parameters to attribute with.
    ``batch_size``/``chunk``: sizes of the data chunks for risk HVPs / vmapped per-example work.
    ``loss_fn``: a per-example loss ``loss_fn(outputs, targets) -> (B,)`` of the user's in place of
    the task's. Loss gradients and true-Hessian products use it; the Gauss-Newton pieces cannot
    (they need l convex in one scalar output f) and raise :class:`CustomLossError`.
    ``memory``: the budget in bytes from which streamed chunks of per-example gradients are
    sized (:mod:`fimoda.memory`; None: half the device's free memory).
    """
    model: torch.nn.Module
    X: torch.Tensor
    Y: torch.Tensor
    task: str
    names: Optional[Sequence[str]] = None
    batch_size: int = 1024
    chunk: int = 256
    progress: bool = True
    loss_fn: Optional[Callable] = None
    memory: Optional[int] = None

    def __post_init__(self):
        check_task(self.task)
        check_data(self.task, self.X, self.Y)
        self.model.eval()
        self.names = param_names(self.model, self.names)
        self.params, self.rest = model_state(self.model, self.names)
        self.n_params = sum(p.numel() for p in self.params.values())
        self.dtype = next(iter(self.params.values())).dtype
        self.device = next(iter(self.params.values())).device
        self.memory = resolve_budget(self.memory, self.device)
        # text batches are padded to the longest sentence of the whole set; each chunk is cut to
        # its own longest (fimoda.models.input_trimmer)
        self.trim = input_trimmer(self.model)
        # Models whose forward cannot run under vmap (e.g. transformers' mask utilities branch on
        # data) say so with ``supports_vmap = False`` or fail the probe; per-example work then loops.
        self.vmap_ok = vmappable(self.model, lambda: self._per_example_fn(self.loss, True)(
            self.params, self.trim(self.X[:2]), self.Y[:2]))

    # -- the functional model
    def out(self, params: dict, x: torch.Tensor) -> torch.Tensor:
        return functional_call(self.model, {**params, **self.rest}, (x,))

    def loss(self, params: dict, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per-example losses of a batch, (B,)."""
        if self.loss_fn is not None:
            return self.loss_fn(self.out(params, x), y)
        return loss_from_f(gn_output(self.out(params, x), y, self.task), y, self.task)

    def f(self, params: dict, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.require_gauss_newton()
        return gn_output(self.out(params, x), y, self.task)

    def require_gauss_newton(self) -> None:
        """Raise :class:`CustomLossError` when a custom ``loss_fn`` replaces the task's loss: the
        Gauss-Newton form l(f) of one scalar output f is known for the task's losses only."""
        if self.loss_fn is not None:
            raise CustomLossError(
                "this method uses the Gauss-Newton form of the loss, l(f) convex in one scalar "
                "output f per example (docs/equations.md), which is known only for the task's "
                "own loss (squared error / cross-entropy), not for a custom loss. Use a method "
                "that needs only loss gradients and the true Hessian (grad_dot, grad_cos, "
                "datainf, lissa_h, arnoldi, prop1, eq16, or cg / dense / trajectory with "
                "hessian='true'), or loss=None")

    def _chunks(self, n: int, size: int, desc: Optional[str]):
        it = range(0, n, size)
        if desc and self.progress and n > size:
            it = progress_bar(it, desc=desc, total=(n + size - 1) // size, leave=False)
        return (slice(s, s + size) for s in it)

    def groups(self, X, size: int, desc: Optional[str] = None):
        """Row groups for per-row work (:func:`fimoda.models.row_groups`: by length for text),
        with a progress bar when there are several."""
        gs = row_groups(self.model, X, size)
        if desc and self.progress and len(gs) > 1:
            return progress_bar(gs, desc=desc, leave=False)
        return gs

    # -- per-example gradients
    @staticmethod
    def _per_example_fn(fn: Callable, vmapped: bool) -> Callable:
        """(params, X, Y) -> {name: per-row gradients of ``fn``}, vmapped or looped over rows."""
        single = lambda p, x, y: fn(p, x.unsqueeze(0), y.unsqueeze(0)).squeeze(0)
        return vmap(grad(single), in_dims=(None, 0, 0)) if vmapped else _looped(grad(single))

    def grad_rows(self) -> int:
        """Per-example gradient rows streamed at once under the memory budget
        (:func:`fimoda.memory.chunk_rows`)."""
        return chunk_rows(self.memory, self.n_params, self.dtype)

    def solve_cols(self) -> int:
        """Right-hand sides (gradient rows) a solver of the damped-inverse methods takes at once
        under the memory budget (:func:`fimoda.memory.solve_columns`)."""
        return solve_columns(self.memory, self.n_params, self.dtype)

    def stream(self, grads: Callable, X, Y, rows: Optional[int] = None, desc=None):
        """``(rows, grads(X[rows], Y[rows]))`` for consecutive slices of at most ``rows`` rows
        (default :meth:`grad_rows`) covering ``X``: per-example gradients (``grads`` is
        :meth:`loss_grads` or :meth:`output_grads`) one chunk at a time, for the caller to
        consume before the next is computed."""
        rows = rows or self.grad_rows()
        for s in self._chunks(len(X), rows, desc):
            yield s, grads(X[s], Y[s], desc=None)

    def _per_example(self, fn: Callable, X, Y, params: Optional[dict], desc) -> torch.Tensor:
        params = self.params if params is None else params
        g = self._per_example_fn(fn, self.vmap_ok)
        out = torch.empty(len(X), self.n_params, dtype=self.dtype, device=self.device)
        # vmapped groups no larger than a streamed chunk: the batched gradients are a second copy
        for s in self.groups(X, min(self.chunk, self.grad_rows()), desc):
            grads, col = g(params, self.trim(X[s]), Y[s]), 0
            for name in self.names:             # written in place: the flatten order, one copy
                t = grads[name].detach()
                k = t[0].numel()
                out[s, col:col + k] = t.reshape(len(t), k)
                col += k
        return out

    def loss_grads(self, X, Y, params: Optional[dict] = None, desc="loss gradients"):
        """Rows grad_theta L(z_i; theta), (N, P). ``params``: evaluate elsewhere than theta^f."""
        return self._per_example(self.loss, X, Y, params, desc)

    def output_grads(self, X, Y, params: Optional[dict] = None, desc="output gradients"):
        """Rows grad_theta f(z_i; theta) of the Gauss-Newton output, (N, P)."""
        return self._per_example(self.f, X, Y, params, desc)

    @torch.no_grad()
    def f_values(self, X, Y, params: Optional[dict] = None) -> torch.Tensor:
        params = self.params if params is None else params
        return torch.cat([self.f(params, self.trim(X[s]), Y[s])
                          for s in self._chunks(len(X), self.batch_size, None)])

    def gn_pieces(self, X, Y, desc="Gauss-Newton pieces"):
        """(Phi, f, l', l''): output gradients (N, P) and the loss derivatives in f."""
        phi = self.output_grads(X, Y, desc=desc)
        f = self.f_values(X, Y)
        d1, d2 = loss_derivatives(f, Y, self.task)
        return phi, f, d1, d2

    # -- full-data risk: gradient and Hessian-vector products (R is a sum)
    def _risk(self, params, x, y):
        return self.loss(params, x, y).sum()

    def risk_grad(self, params: Optional[dict] = None) -> torch.Tensor:
        """grad R(D; theta), flattened."""
        params = self.params if params is None else params
        total = torch.zeros(self.n_params, dtype=self.dtype, device=self.device)
        for s in range(0, len(self.X), self.batch_size):
            sl = slice(s, s + self.batch_size)
            total += flatten(grad(self._risk)(params, self.trim(self.X[sl]), self.Y[sl]), self.names)
        return total

    def _hessian_vector(self, gfun, vd: dict) -> dict:
        """d/dt gfun(theta^f + t v) at t = 0 for a gradient function ``gfun``: H v by
        forward-over-reverse, or -- where the loss has no forward-mode derivative in torch (e.g.
        ``F.huber_loss``) -- by reverse-over-reverse, (grad of gfun)^T v, equal since H is
        symmetric. The choice is made once per problem."""
        if getattr(self, "_forward_ad", True):
            try:
                return jvp(gfun, (self.params,), (vd,))[1]
            except NotImplementedError as e:
                if "forward AD" not in str(e) and "forward-mode" not in str(e):
                    raise
                self._forward_ad = False
        return vjp(gfun, self.params)[1](vd)[0]

    def hvp(self, v: torch.Tensor) -> torch.Tensor:
        """H v with H = the true Hessian of R(D; theta^f) (:meth:`_hessian_vector`)."""
        vd = unflatten(v, self.params, self.names)
        total = torch.zeros_like(v)
        for s in range(0, len(self.X), self.batch_size):
            sl = slice(s, s + self.batch_size)
            gfun = lambda p: grad(self._risk)(p, self.trim(self.X[sl]), self.Y[sl])
            total += flatten(self._hessian_vector(gfun, vd), self.names)
        return total

    def gnvp(self, v: torch.Tensor) -> torch.Tensor:
        """G v with G = sum_i l''_i grad f_i grad f_i^T (Gauss-Newton Hessian of R)."""
        vd = unflatten(v, self.params, self.names)
        total = torch.zeros_like(v)
        for s in range(0, len(self.X), self.batch_size):
            x, y = self.trim(self.X[s:s + self.batch_size]), self.Y[s:s + self.batch_size]
            fx = lambda p: self.f(p, x, y)
            f, jv = jvp(fx, (self.params,), (vd,))
            _, d2 = loss_derivatives(f.detach(), y, self.task)
            _, pull = vjp(fx, self.params)
            total += flatten(pull(d2 * jv)[0], self.names)
        return total

    def per_example_hvp(self, X, Y, v: torch.Tensor, desc="per-example HVPs") -> torch.Tensor:
        """Rows grad^2 L(z_i; theta^f) v, (N, P) (the extra term of Prop. 1)."""
        vd = unflatten(v, self.params, self.names)

        def one(x, y):
            gfun = lambda p: grad(lambda q: self.loss(q, x[None], y[None]).sum())(p)
            return self._hessian_vector(gfun, vd)

        g = vmap(one) if self.vmap_ok else _looped(lambda p, x, y: one(x, y))
        rows = []
        for s in self._chunks(len(X), self.chunk, desc):
            out = g(self.trim(X[s]), Y[s]) if self.vmap_ok else g(None, self.trim(X[s]), Y[s])
            rows.append(flatten(out, self.names, batched=True).detach())
        return torch.cat(rows)

    def dense_hessian(self, gauss_newton: bool = False) -> torch.Tensor:
        """The P x P Hessian (true or Gauss-Newton) by HVPs with the identity: small models only."""
        op = self.gnvp if gauss_newton else self.hvp
        eye = torch.eye(self.n_params, dtype=self.dtype, device=self.device)
        H = torch.stack([op(e) for e in eye])
        return 0.5 * (H + H.T)


def _looped(fn):
    """``fn(params, x, y) -> dict`` over the rows of x, y one at a time, stacked like vmap."""
    def run(params, X, Y):
        outs = [fn(params, x, y) for x, y in zip(X, Y)]
        return {k: torch.stack([o[k] for o in outs]) for k in outs[0]}
    return run


def mean_sq_grad(G: torch.Tensor) -> float:
    """lambda_G of the reference code: mean of the squared elements of the training gradients."""
    return float((G ** 2).mean())
