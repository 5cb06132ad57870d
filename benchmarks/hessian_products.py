"""Speed of the training-set Hessian products that CG, LiSSA-H and the generalized influence
functions (Prop. 1, eq. 16) spend their time in: ``fimoda.influence.inverse.block_products``.

On identical work (a 2x128 ReLU MLP of FICO's shape, float64, a block of k columns over n rows),
in one process, best of ``--repeats``:

- R-operator: the hand-written, batched R-operator of a Linear-ReLU stack
  (``fimoda.influence.rop``; what fimoda runs for these models' true Hessian);
- batched backward: autograd's reverse-over-reverse differentiated for a block of columns at once
  (``torch.autograd.grad(..., is_grads_batched=True)``; what fimoda runs for other models);
- per column: one backward pass per column (what runs for models that cannot vmap, and what
  fimoda ran before);
- forward-over-reverse: ``torch.func.jvp`` of ``grad``, vmapped over the columns.

The results are compared numerically; the machine's float64 matmul rate is measured in the same
process and printed with them, and each time is also given as a multiple of one gradient of the
same rows (the cost floor of any Hessian product is a small multiple of it).

Run:  python benchmarks/hessian_products.py [--threads 2] [--n 2048] [--k 64] [--hessian true]
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import torch
from torch.func import grad, jvp, vmap

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from fimoda.gradients import Problem, flatten, unflatten  # noqa: E402
from fimoda.influence.inverse import block_products  # noqa: E402
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
    ap.add_argument("--n", type=int, default=2048, help="training rows")
    ap.add_argument("--d", type=int, default=23, help="input features (FICO: 23)")
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

    ref, t_b = best(lambda: block_products(p, X, Y, V, a.hessian, autograd=True), a.repeats)
    looped_problem = dataclasses.replace(p)
    looped_problem.vmap_ok = False
    looped, t_l = best(lambda: block_products(looped_problem, X, Y, V, a.hessian, autograd=True),
                       a.repeats)
    _, t_g = best(lambda: grad(lambda q: p.loss(q, X, Y).sum())(p.params), a.repeats)
    rows = [("autograd, batched backward", t_b, ref), ("autograd, one backward per column", t_l,
                                                      looped)]
    if a.hessian == "true":
        rop, t_r = best(lambda: block_products(p, X, Y, V, a.hessian), a.repeats)
        rows.insert(0, ("R-operator by hand", t_r, rop))
    if a.hessian == "true":
        def fwd_over_rev(v):
            tangent = unflatten(v, p.params, p.names)
            return flatten(jvp(grad(lambda q: p.loss(q, X, Y).sum()), (p.params,),
                               (tangent,))[1], p.names)
        fr, t_f = best(lambda: vmap(fwd_over_rev, in_dims=1, out_dims=1)(V), a.repeats)
        rows.append(("forward-over-reverse, vmapped", t_f, fr))
    for name, t, out in rows:
        diff = float((out - ref).norm() / ref.norm())
        print(f"{name:34s} {t * 1e3 / a.k:8.2f} ms per column = {t / a.k / t_g:5.2f} gradients "
              f"of the n rows; relative difference to autograd {diff:.1e}")
    print(f"speed-up of autograd's batched backward over one backward per column: "
          f"{t_l / t_b:.2f}x")
    if a.hessian == "true":
        print(f"speed-up of the R-operator over one backward per column: {t_l / t_r:.2f}x, "
              f"over autograd's batched backward: {t_b / t_r:.2f}x")


if __name__ == "__main__":
    main()
