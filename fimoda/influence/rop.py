"""Exact true-Hessian products of a Linear-ReLU network by Pearlmutter's R-operator, written out
by hand and batched over a block of directions (the paper's tabular MLPs).

For the training risk R = sum_i L(z_i) and a block of k directions V (one column per direction),
H V is the directional derivative R{.} of the gradient along V. With the forward pass
z_l = h_{l-1} W_l^T + b_l, h_l = relu(z_l) (h_0 = x, f = z_L) and the backward pass
delta_L = dl/df, grad W_l = delta_l^T h_{l-1}, grad b_l = sum delta_l,
delta_{l-1} = (delta_l W_l) * [z_{l-1} > 0], the R-operator gives (relu'' = 0 almost everywhere,
and relu' is the same mask as autograd's)

    R{z_l} = R{h_{l-1}} W_l^T + h_{l-1} V_{W_l}^T + V_{b_l},     R{h_l} = R{z_l} * [z_l > 0]
    R{delta_L} = (d^2 l / df^2) R{f}
    R{grad W_l} = R{delta_l}^T h_{l-1} + delta_l^T R{h_{l-1}},  R{grad b_l} = sum R{delta_l}
    R{delta_{l-1}} = (R{delta_l} W_l + delta_l V_{W_l}) * [z_{l-1} > 0]

with d^2 l/df^2 = 2 for squared error and diag(p) - p p^T (p = softmax(f)) for cross-entropy.
Every product is one batched matmul over the k directions: about twice the flops of a gradient
per direction, against about four for autograd's reverse-over-reverse (``block_products``).
Checked against autograd in the tests.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..models import linear_relu_layers


class LinearReluHessian:
    """H V for a ``Problem`` whose model is a Linear-ReLU stack (:func:`linear_relu_layers`) with
    the squared-error or cross-entropy loss of fimoda's tasks. Parameters that are not
    attributed (not in ``problem.names``) are held fixed: V has no rows for them and H V none."""

    def __init__(self, problem, layers):
        self.task = problem.task
        named = dict(problem.model.named_parameters())
        by_id = {id(p): n for n, p in named.items()}
        offsets, k = {}, 0
        for n in problem.names:
            offsets[n] = (k, named[n].numel())
            k += named[n].numel()
        self.P = k
        self.layers = []       # per layer: (W, b, W's slice or None, b's slice or None)
        for lin in layers:
            wn, bn = by_id[id(lin.weight)], by_id.get(id(lin.bias)) if lin.bias is not None else None
            W = problem.params[wn] if wn in problem.params else problem.rest[wn]
            b = None if bn is None else (problem.params[bn] if bn in problem.params
                                         else problem.rest[bn])
            self.layers.append((W, b, offsets.get(wn), offsets.get(bn)))

    @staticmethod
    def build(problem) -> Optional["LinearReluHessian"]:
        """The R-operator for ``problem``, or None when its model is not a Linear-ReLU stack or
        its task's loss is not one this module differentiates."""
        if problem.task not in ("regression", "classification"):
            return None
        layers = linear_relu_layers(problem.model, require_grad=False)
        if layers is None:
            return None
        if problem.task == "regression" and layers[-1].out_features != 1:
            return None
        return LinearReluHessian(problem, layers)

    def _direction(self, V, sl, shape):
        """The (k, *shape) block of V for one parameter (zeros when it is not attributed)."""
        if sl is None:
            return None
        a, m = sl
        return V[a:a + m].T.reshape(V.shape[1], *shape)

    def __call__(self, X: torch.Tensor, Y: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
        """sum over the rows of (X, Y) of grad^2 L(z) V, for V of shape (P, k)."""
        k = V.shape[1]
        out = torch.zeros_like(V)
        L = len(self.layers)
        VW = [self._direction(V, sw, W.shape) for W, _, sw, _ in self.layers]
        # forward pass and its R-pass: hs[l] = h_l, rhs[l] = R{h_l} (None: zero), masks[l]
        hs, rhs, masks = [X], [None], []
        for li, (W, b, sw, sb) in enumerate(self.layers):
            h, rh = hs[-1], rhs[-1]
            z = h @ W.T if b is None else torch.addmm(b, h, W.T)
            rz = None if rh is None else rh @ W.T                           # (k, B, out)
            if VW[li] is not None:
                t = torch.matmul(h, VW[li].transpose(1, 2))                  # h V_W^T
                rz = t if rz is None else rz.add_(t)
            if sb is not None:
                vb = self._direction(V, sb, b.shape)[:, None, :]
                rz = vb.expand(k, *z.shape).clone() if rz is None else rz.add_(vb)
            if rz is None:
                rz = z.new_zeros(k, *z.shape)
            if li < L - 1:
                mask = z > 0
                masks.append(mask)
                hs.append(z * mask)
                rhs.append(rz * mask)
            else:
                f, rf = z, rz
        # the loss: delta_L = dl/df and R{delta_L} = (d^2 l/df^2) R{f}
        if self.task == "regression":
            delta = 2.0 * (f - Y.reshape(f.shape))
            rdelta = 2.0 * rf
        else:
            p = torch.softmax(f, dim=-1)
            delta = p.clone()
            delta[torch.arange(len(Y), device=Y.device), Y] -= 1.0
            rdelta = p * rf - p * (p * rf).sum(-1, keepdim=True)
        # backward pass and its R-pass
        for li in reversed(range(L)):
            W, b, sw, sb = self.layers[li]
            if sw is not None:
                g = torch.matmul(rdelta.transpose(1, 2), hs[li])              # R{delta}^T h
                if rhs[li] is not None:
                    g = g.add_(torch.matmul(delta.T, rhs[li]))               # delta^T R{h}
                a, m = sw
                out[a:a + m] += g.reshape(k, m).T
            if sb is not None:
                a, m = sb
                out[a:a + m] += rdelta.sum(1).T
            if li > 0:
                r = rdelta @ W
                if VW[li] is not None:
                    r = r.add_(torch.matmul(delta, VW[li]))                  # delta V_W
                mask = masks[li - 1]
                rdelta = r * mask
                delta = (delta @ W) * mask
        return out
