"""Speed of group leave-out further training (notebook 08's group runs and further-training LDS)
against the one-model-at-a-time reference loop, on identical work.

Concrete (or same-shaped synthetic data), a 2x128 ReLU MLP in float64 briefly trained to a
theta^f, SGD with ``--lr``, batch ``--batch-size``, ``--mechanism`` remove (default, the tabular
reference) or subtract, one seed, ``--epochs`` epochs, in one process:

- groups: ``--groups`` random groups of each size in ``--sizes`` drawn from ``--n-loo`` left-out
  instances, plus the further-training LDS's ``--subsets`` complements (each leaves out half of L),
  as notebook 08 runs them;
- vectorised: ``fimoda.gold.further_train`` on all of them at once (best of ``--repeats``);
- reference: ``fimoda.gold.reference_further_train`` (nn.Module + torch.optim, one run at a
  time) on the full run and the first ``--ref-runs`` groups, timed and compared numerically with
  the vectorised results of the same runs.

Printed: runs/s and model-steps/s of each, their ratio, and each as a fraction of the machine's
float64 matmul rate (measured in the same process), counting every run as the full run's steps
and 6 x B x sum_layers (in x out) FLOPs per model-step (forward + backward of one model on one
batch of B rows).

Run:  python benchmarks/group_speed.py [--threads 2] [--epochs 3]
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from gold_speed import final_model, load_data, matmul_rate, warm_up  # noqa
from fimoda.gold import GoldConfig, further_train, reference_further_train  # noqa
from fimoda.yardsticks.lds_runs import draw_subsets  # noqa


def draw_groups(loo: np.ndarray, sizes, per_size: int, subsets: int, seed: int = 0) -> list:
    """``per_size`` random groups of each size from ``loo``, then the LDS complements: for each
    of ``subsets`` random halves K of ``loo``, the group ``loo`` minus K."""
    g = np.random.default_rng(seed)
    out = [np.sort(g.choice(loo, size=k, replace=False)) for k in sizes for _ in range(per_size)]
    for kept in draw_subsets(len(loo), subsets, 0.5, seed):
        out.append(np.sort(np.setdiff1d(loo, loo[kept])))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dataset", default="concrete")
    ap.add_argument("--data-dir", default=os.environ.get("FIMODA_DATA_DIR"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--n-loo", type=int, default=100)
    ap.add_argument("--sizes", default="1,2,5,10,20,50")
    ap.add_argument("--groups", type=int, default=4, help="groups per size")
    ap.add_argument("--subsets", type=int, default=16, help="further-training LDS subsets")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=3e-2)
    ap.add_argument("--mechanism", default="remove", choices=["remove", "subtract"])
    ap.add_argument("--ref-runs", type=int, default=6, help="groups run by the reference loop")
    ap.add_argument("--repeats", type=int, default=3, help="vectorised timing: best of")
    ap.add_argument("--matmul-size", type=int, default=2048)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    X, y, Xt, yt, name = load_data(args.dataset, args.data_dir)
    X, y = torch.as_tensor(X), torch.as_tensor(y)
    Xt, yt = torch.as_tensor(Xt), torch.as_tensor(yt)
    model = final_model(X, y)
    n = len(X)
    loo = np.random.default_rng(0).choice(n, size=args.n_loo, replace=False)
    sizes = [int(s) for s in args.sizes.split(",")]
    groups = draw_groups(loo, sizes, args.groups, args.subsets)
    G = max(len(g) for g in groups)
    padded = np.full((len(groups), G), -1, dtype=np.int64)     # (m, G) groups, -1 = padding
    for r, g in enumerate(groups):
        padded[r, :len(g)] = g
    cfg = GoldConfig(lr=args.lr, epochs=args.epochs, batch_size=args.batch_size, seeds=(0,),
                     mechanism=args.mechanism, optimizer="sgd", progress=False)
    warm_up()

    best = math.inf
    for _ in range(args.repeats):
        t = time.perf_counter()
        res = further_train(model, "regression", X, y, Xt, yt, padded, cfg)
        best = min(best, time.perf_counter() - t)
    runs = len(groups) + 1
    k = args.ref_runs
    t = time.perf_counter()
    ref = reference_further_train(model, "regression", X, y, Xt, yt, padded[:k], cfg)
    t_ref = time.perf_counter() - t
    diff = max(np.abs(res.loss_full - ref.loss_full).max(),
               np.abs(res.loss_loo[:, :k] - ref.loss_loo).max())

    steps_full = args.epochs * math.ceil(n / args.batch_size)   # the full run's steps
    fl_step = 6 * args.batch_size * sum(m.in_features * m.out_features
                                        for m in model.modules() if hasattr(m, "in_features"))
    rate = matmul_rate(args.matmul_size)
    vec = runs * steps_full / best
    refr = (k + 1) * steps_full / t_ref
    print(f"{name}: n={n}, {len(groups)} groups (sizes {args.sizes} x {args.groups}, "
          f"{args.subsets} LDS complements of |L|/2 = {args.n_loo // 2}), {args.epochs} epochs, "
          f"batch {args.batch_size}, {args.mechanism}, float64, {args.threads} threads")
    print(f"machine: {rate:.1f} GFLOP/s float64 matmul ({args.matmul_size}^2)")
    print(f"vectorised: {runs} runs in {best:.2f} s (best of {args.repeats}): {runs / best:.1f} "
          f"runs/s, {vec:.0f} model-steps/s, {vec * fl_step / 1e9 / rate:.1%} of the matmul rate")
    print(f"reference loop: {k + 1} runs in {t_ref:.2f} s: {(k + 1) / t_ref:.2f} runs/s, "
          f"{refr:.0f} model-steps/s, {refr * fl_step / 1e9 / rate:.1%} of the matmul rate")
    print(f"ratio (vectorised / reference, runs/s): {vec / refr:.1f}x; largest test-loss "
          f"difference on the shared runs: {diff:.1e}")


if __name__ == "__main__":
    main()
