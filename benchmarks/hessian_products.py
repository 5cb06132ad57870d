"""Speed of the training-set Hessian products that CG, LiSSA-H and the generalized influence
functions (Prop. 1, eq. 16) spend their time in: ``fimoda.influence.operators.block_products``.

On identical work (a 2x128 ReLU MLP of FICO's or Adult's shape, float64, a block of k columns over
n rows), in one process, best of ``--repeats``:

- per column: autograd's reverse-over-reverse, the gradient's graph built once per data chunk
  and differentiated once per column (``block_products``: what fimoda runs);
- batched backward: the same graph differentiated for all k columns at once
  (``torch.autograd.grad(..., is_grads_batched=True)``);
- forward-over-reverse: ``torch.func.jvp`` of ``grad``, vmapped over the columns.

The results are compared numerically; the machine's float64 matmul rate is measured in the same
process and printed with them, and each time is also given as a multiple of one gradient of the
same rows (the cost floor of any Hessian product is a small multiple of it). On a 2-core machine
the per-column loop was the fastest of the three (the batched variants move k-times larger
temporaries through memory), which is why ``block_products`` loops.

Run:  python benchmarks/hessian_products.py [--threads 2] [--n 4096] [--d 100] [--k 64]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.func import grad, jvp, vmap

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from fimoda.gradients import Problem, flatten, unflatten  # noqa: E402
from fimoda.influence.operators import block_products  # noqa: E402
from fimoda.models import MLP  # noqa: E402


def best(fn, repeats: int):
    out, times = None, []
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return out, min(times)


def matmul_rate(size: int = 2048) -> float:
    a, b = (torch.randn(size, size, dtype=torch.float64) for _ in range(2))
    a @ b
    _, t = best(lambda: a @ b, 5)
    return 2 * size ** 3 / t / 1e9


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--n", type=int, default=4096, help="training rows")
    ap.add_argument("--d", type=int, default=100, help="input features (FICO 23, Adult ~100)")
    ap.add_argument("--k", type=int, default=64, help="columns in the block")
    ap.add_argument("--hessian", default="true", choices=["true", "gn"])
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    g = torch.Generator().manual_seed(0)
    X = torch.randn(a.n, a.d, generator=g, dtype=torch.float64)
    Y = torch.randint(0, 2, (a.n,), generator=g)
    torch.manual_seed(0)
    model = MLP(a.d, 2).double()
    p = Problem(model, X, Y, "classification", progress=False)
    V = torch.randn(p.n_params, a.k, generator=g, dtype=torch.float64)
    rate = matmul_rate()
    print(f"MLP 2x128, d={a.d}, P={p.n_params}, n={a.n}, k={a.k}, {a.hessian} Hessian, float64, "
          f"torch threads={torch.get_num_threads()}; float64 matmul rate {rate:.1f} GFLOP/s")

    ref, t_l = best(lambda: block_products(p, X, Y, V, a.hessian), a.repeats)
    _, t_g = best(lambda: grad(lambda q: p.loss(q, X, Y).sum())(p.params), a.repeats)
    rows = [("per column (fimoda)", t_l, ref)]
    if a.hessian == "true":
        params = {n: t.detach().requires_grad_(True) for n, t in p.params.items()}
        plist = [params[n] for n in p.names]

        def batched_backward():
            out = torch.zeros_like(V)
            for s in range(0, len(X), p.batch_size):
                x, y = X[s:s + p.batch_size], Y[s:s + p.batch_size]
                gs = torch.autograd.grad(p.loss(params, x, y).sum(), plist, create_graph=True)
                g_flat = torch.cat([q.reshape(-1) for q in gs])
                hs = torch.autograd.grad(g_flat, plist, grad_outputs=V.T.contiguous(),
                                         is_grads_batched=True)
                out += torch.cat([h.reshape(a.k, -1) for h in hs], 1).T
            return out
        bb, t_b = best(batched_backward, a.repeats)
        rows.append(("batched backward", t_b, bb))

        def fwd_over_rev(v):
            tangent = unflatten(v, p.params, p.names)
            return flatten(jvp(grad(lambda q: p.loss(q, X, Y).sum()), (p.params,),
                               (tangent,))[1], p.names)
        fr, t_f = best(lambda: vmap(fwd_over_rev, in_dims=1, out_dims=1)(V), a.repeats)
        rows.append(("forward-over-reverse, vmapped", t_f, fr))

    for name, t, out in rows:
        diff = float((out - ref).norm() / ref.norm())
        print(f"{name:32s} {t * 1e3 / a.k:8.2f} ms per column = {t / a.k / t_g:5.2f} gradients "
              f"of the n rows; relative difference to fimoda's {diff:.1e}")
    for name, t, _ in rows[1:]:
        print(f"per column vs {name}: {t / t_l:.2f}x faster")


if __name__ == "__main__":
    main()
