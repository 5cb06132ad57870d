"""The engines that compute the per-run gradients and test losses of stacked further-training
runs, and the choice of engine for a model.

All runs of a seed are trained at once on stacked parameters (a leading run dimension). Each step
every run r has its own padded index batch ``idx[r, :]`` with weights ``w[r, :]`` (1/|batch| on
real items, 0 on padding, -1/n on the subtracted z_i), so its loss is
``sum_m w[r, m] L(z_idx[r, m]; theta_r)`` (padding slots go through the model with weight 0, so
the model must act on each example independently, as every model in eval mode does). Three
engines compute the per-run gradients:
- ``mlp``: Linear/ReLU stacks (the paper's tabular MLPs) by explicit batched matmuls (``bmm``)
  with a hand-written backward pass, in cache-sized blocks of runs (on a CPU spread over
  ``GoldConfig.workers`` threads, one per core by default);
- ``func``: any ``nn.Module`` (in eval mode: BatchNorm uses its running statistics, dropout is
  off) through ``torch.func.functional_call`` + ``vmap(grad(...))``;
- ``loop``: models ``vmap`` cannot batch (Hugging Face encoders), one run after the other.
"""
from __future__ import annotations

import logging

import numpy as np
import torch
import torch.nn as nn
from torch.func import functional_call, grad, vmap

from ..losses import per_example_loss
from ..models import TEXT_GROUP, input_trimmer, linear_relu_layers, vmappable
from .config import GoldConfig

log = logging.getLogger(__name__)


def _relu_backward_(grad: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """grad * [out > 0] in place (the kernel of ReLU's backward; half the time of the
    out-of-place op, which allocates)."""
    return torch.ops.aten.threshold_backward.grad_input(grad, out, 0, grad_input=grad)


class _MLPEngine:
    """Linear/ReLU stacks by batched matmuls. Weights are kept transposed, W^T: (R, in, out);
    biases (R, 1, out). Forward h_l = relu(h_{l-1} W_l^T + b_l); backward by hand:
    dW_l^T = h_{l-1}^T d_l, db_l = sum_m d_l, d_{l-1} = (d_l W_l) * [h_{l-1} > 0]."""

    name = "mlp"

    def __init__(self, layers, task: str):
        self.task = task
        self.loss_fn = per_example_loss(task)
        self.start = []        # unstacked start parameters, internal layout
        self.bias = []
        for lin in layers:
            self.start.append(lin.weight.detach().t().contiguous())
            self.bias.append(lin.bias is not None)
            if lin.bias is not None:
                self.start.append(lin.bias.detach().reshape(1, -1).clone())
        self.n_out = layers[-1].out_features

    def supports(self) -> bool:
        return (self.task == "regression" and self.n_out == 1) or \
               (self.task == "classification" and self.n_out >= 2)

    def stack(self, R: int) -> list:
        return [p.unsqueeze(0).repeat(R, *([1] * p.dim())) for p in self.start]

    def _forward(self, P, x):
        hs, k, h = [x], 0, x
        L = len(self.bias)
        for li, has_b in enumerate(self.bias):
            W = P[k]
            if x.dim() == 2 and li == 0:       # shared input (J, d): broadcast over runs
                z = torch.matmul(h, W)
                if has_b:
                    z = z.add_(P[k + 1])
            else:
                z = torch.baddbmm(P[k + 1], h, W) if has_b else torch.bmm(h, W)
            k += 1 + has_b
            if li < L - 1:
                h = z.clamp_min_(0)
                hs.append(h)
            else:
                return z, hs

    def grads(self, P, x, y, w):
        out, hs = self._forward(P, x)
        w = w.unsqueeze(-1)
        if self.task == "regression":
            d = w * (2 * (out - y.unsqueeze(-1)))
        else:
            p = torch.softmax(out, dim=-1)
            p.scatter_add_(-1, y.unsqueeze(-1), torch.full_like(w, -1.0))
            d = w * p
        grads = [None] * len(P)
        ks = np.cumsum([0] + [1 + b for b in self.bias])[:-1]
        for li in reversed(range(len(self.bias))):
            k, h = ks[li], hs[li]
            grads[k] = torch.bmm(h.transpose(1, 2), d)
            if self.bias[li]:
                grads[k + 1] = d.sum(1, keepdim=True)
            if li > 0:
                W = P[k]
                dh = d * W.transpose(1, 2) if d.shape[-1] == 1 else torch.bmm(d, W.transpose(1, 2))
                d = _relu_backward_(dh, h)
        return grads

    def test_losses(self, P, Xt, yt):
        out, _ = self._forward(P, Xt)
        G, J = out.shape[:2]
        return self.loss_fn(out.reshape(G * J, -1), yt.repeat(G)).reshape(G, J)


def used_parameters(model: nn.Module, loss_fn, X, Y) -> list[str]:
    """Names of the trainable parameters the loss depends on (tried on two examples). The others
    (e.g. an encoder's unused pooler) get no gradient, and ``torch.optim`` skips them entirely
    (no weight decay either), so they are held fixed here too."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = [p for n, p in model.named_parameters() if p.requires_grad]
    with torch.enable_grad():
        loss = loss_fn(model(input_trimmer(model)(X[:2])), Y[:2]).sum()
        grads = torch.autograd.grad(loss, params, allow_unused=True)
    return [n for n, g in zip(names, grads) if g is not None]


class FuncEngine:
    """Any ``nn.Module`` via ``torch.func``: per-run gradients of
    sum_m w[m] L(z_m; theta_r) by ``vmap(grad(functional_call))`` over stacked parameters; the
    buffers (BatchNorm running statistics), frozen and unused parameters are shared."""

    name = "func"

    def __init__(self, model: nn.Module, loss_fn, used: list, eval_batch: int = 256):
        self.model, self.eval_batch = model, eval_batch
        self.loss_fn = loss_fn
        self.trim = input_trimmer(model)
        self.names = list(used)
        self.start = [p.detach().clone() for n, p in model.named_parameters() if n in used]
        fixed = {n: p.detach() for n, p in model.named_parameters() if n not in used}
        fixed.update({n: b.detach() for n, b in model.named_buffers()})
        self.fixed = fixed
        loss_fn, names = self.loss_fn, self.names

        def run_loss(plist, x, y, w):
            out = functional_call(model, {**dict(zip(names, plist)), **fixed}, (x,))
            return (w * loss_fn(out, y)).sum()

        def run_test(plist, x, y):
            out = functional_call(model, {**dict(zip(names, plist)), **fixed}, (x,))
            return loss_fn(out, y)

        self._grads = vmap(grad(run_loss))
        self._test = vmap(run_test, in_dims=(0, None, None))

    def supports(self) -> bool:
        return True

    def stack(self, R: int) -> list:
        return [p.unsqueeze(0).repeat(R, *([1] * p.dim())) for p in self.start]

    def column_groups(self, x):
        """Batch positions (dim 1 of the runs' batches ``x``, (R, B, ...)) in groups of similar
        length for a padded-text model (:func:`fimoda.models.row_groups` on each position's
        longest row over the runs), None for any other model: a run's gradient is a sum over its
        rows, so summing it group by group, each group trimmed to its own longest row, is the same
        gradient at a fraction of the padded tokens."""
        lengths = getattr(self.model, "input_lengths", None)
        if lengths is None or x.shape[1] <= TEXT_GROUP:
            return None
        longest = lengths(x.flatten(0, 1)).view(x.shape[0], x.shape[1]).amax(0)
        order = torch.argsort(longest.cpu(), stable=True).to(x.device)
        return [order[s:s + TEXT_GROUP] for s in range(0, len(order), TEXT_GROUP)]

    def grads(self, P, x, y, w):
        groups = self.column_groups(x)
        if groups is None:
            return list(self._grads(tuple(P), self.trim(x), y, w))
        total = None
        for g in groups:
            part = self._grads(tuple(P), self.trim(x[:, g]), y[:, g], w[:, g])
            total = list(part) if total is None else [t.add_(q) for t, q in zip(total, part)]
        return total

    def test_losses(self, P, Xt, yt):
        outs = [self._test(tuple(P), self.trim(Xt[a:a + self.eval_batch]),
                           yt[a:a + self.eval_batch])
                for a in range(0, len(Xt), self.eval_batch)]
        return torch.cat(outs, 1)


class _LoopEngine(FuncEngine):
    """Any ``nn.Module``, one run after the other: ``functional_call`` + ``torch.autograd.grad``
    per run on the stacked parameters. For models ``vmap`` cannot batch (data-dependent control
    flow, e.g. the attention-mask handling of Hugging Face encoders); the optimizer, batch plan
    and bookkeeping stay vectorised."""

    name = "loop"

    def grads(self, P, x, y, w):
        groups = self.column_groups(x) or [slice(None)]
        out = [torch.empty_like(p) for p in P]
        with torch.enable_grad():
            for r in range(P[0].shape[0]):
                pr = [p[r].detach().requires_grad_() for p in P]
                params = {**dict(zip(self.names, pr)), **self.fixed}
                loss = sum((w[r, g] * self.loss_fn(functional_call(self.model, params,
                                                                   (self.trim(x[r, g]),)),
                                                   y[r, g])).sum() for g in groups)
                for o, g in zip(out, torch.autograd.grad(loss, pr)):
                    o[r] = g
        return out

    def test_losses(self, P, Xt, yt):
        rows = []
        for r in range(P[0].shape[0]):
            params = {**dict(zip(self.names, [p[r] for p in P])), **self.fixed}
            rows.append(torch.cat([
                self.loss_fn(functional_call(self.model, params,
                                             (self.trim(Xt[a:a + self.eval_batch]),)),
                             yt[a:a + self.eval_batch])
                for a in range(0, len(Xt), self.eval_batch)]))
        return torch.stack(rows)


def _vmappable(engine: FuncEngine, X, Y) -> bool:
    """Whether ``vmap`` can batch the model's gradient (:func:`fimoda.models.vmappable`, tried on
    two examples)."""
    P = engine.stack(1)
    x, y = X[:2].unsqueeze(0), Y[:2].unsqueeze(0)
    w = torch.full((1, len(x[0])), 0.5, dtype=P[0].dtype, device=X.device)
    return vmappable(engine.model, lambda: engine.grads(P, x, y, w))


def make_engine(model: nn.Module, task: str, cfg: GoldConfig, X, Y, loss=None):
    """``mlp`` for Linear/ReLU stacks, else ``func`` (vmap), else ``loop`` (auto). On a CPU a
    convolutional model gets ``loop`` (auto): vmap turns each run's convolution into one grouped
    convolution, which the CPU kernels run slower than the runs one after the other
    (benchmarks/gold_speed_large.py). ``loss(outputs, targets) -> (B,)``: a per-example loss of
    the user's in place of the task's (:func:`fimoda.losses.per_example_loss`); the ``mlp``
    engine differentiates only the task's losses (by hand), so a custom loss takes another."""
    if loss is not None and cfg.engine == "mlp":
        raise ValueError("engine='mlp' differentiates only the task's built-in losses; a custom "
                         "loss needs engine='func', 'loop' or 'auto'")
    if cfg.engine in ("auto", "mlp") and loss is None:
        layers = linear_relu_layers(model)
        eng = _MLPEngine(layers, task) if layers is not None else None
        if eng is not None and eng.supports():
            return eng
        if cfg.engine == "mlp":
            raise ValueError("engine='mlp' needs a Linear/ReLU stack (fimoda.models.MLP or an "
                             "nn.Sequential of Linear, ReLU, ..., Linear) with one output for "
                             "regression or >= 2 logits for classification; use engine='func'")
    loss_fn = per_example_loss(task) if loss is None else loss
    used = used_parameters(model, loss_fn, X, Y)
    if not used:
        raise ValueError("the loss does not depend on any trainable parameter of the model")
    convolutional = any(isinstance(m, nn.modules.conv._ConvNd) for m in model.modules())
    if cfg.engine == "loop" or (cfg.engine == "auto" and convolutional
                                and X.device.type == "cpu"):
        return _LoopEngine(model, loss_fn, used)
    eng = FuncEngine(model, loss_fn, used)
    if _vmappable(eng, X, Y):
        return eng
    if cfg.engine == "func":
        raise ValueError("torch.func.vmap cannot batch this model's gradient (data-dependent "
                         "control flow); use engine='loop' or 'auto'")
    log.info("vmap cannot batch this model; using the per-run loop engine")
    return _LoopEngine(model, loss_fn, used)
