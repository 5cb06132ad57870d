"""Speed of the gold standard on ResNet-9 and on the encoder's top layers (issue #9 rows).

For each model, on identical work in one process -- the full run and ``--runs`` - 1 left-out runs
of one seed, ``--steps`` steps, ``subtract`` -- the vectorised engine (``further_train``: vmap over
stacked runs) against the one-model reference loop (``reference_further_train``: nn.Module +
torch.optim), both checked to agree. FLOPs of one model-step (forward + backward of one model on
one batch) are counted by ``torch.utils.flop_counter.FlopCounterMode``; with the float32 matmul
rate measured here they give the fraction of the machine each engine achieves.

- ResNet-9 at the cpu profile's width (16) on 28x28 one-channel images (Fashion-MNIST's shape),
  SGD lr 0.04, weight decay 1e-3, batch 128, BatchNorm in eval mode, random crop + flip replayed.
- The encoder (all-MiniLM-L6-v2, offline) as the cpu profile trains it: its top 3 layers + head
  on the frozen trunk's features of SST-2-length sentences (the last layer at [CLS] only), AdamW
  lr 1e-6, clip 1, batch 64.

    python benchmarks/gold_speed_large.py [--runs 5] [--steps 4] [--threads 2]
"""
from __future__ import annotations

import argparse
import functools
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
from fimoda.gold import GoldConfig, further_train, reference_further_train  # noqa
from fimoda.losses import per_example_loss  # noqa
from fimoda.models import ResNet9, input_trimmer, row_groups  # noqa


def matmul_rate(size: int = 2048, repeats: int = 5) -> float:
    """Best float32 GFLOP/s of a size x size matmul."""
    a = torch.randn(size, size)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ a
        best = min(best, time.perf_counter() - t0)
    return 2 * size ** 3 / best / 1e9


def step_flops(model, x, y) -> float:
    """FLOPs of forward + backward of ``model`` on the batch (x, y), counted as the vectorised
    engine computes it: padded text in groups of similar length (fimoda.models.row_groups), each
    trimmed to its own longest sentence (the reference loop's extra padding is not counted)."""
    trim = input_trimmer(model)
    model.zero_grad(set_to_none=True)
    with FlopCounterMode(display=False) as fc:
        loss = sum(per_example_loss("classification")(model(trim(x[g])), y[g]).sum()
                   for g in row_groups(model, x, len(x)))
        (loss / len(x)).backward()
    model.zero_grad(set_to_none=True)
    return float(fc.get_total_flops())


def resnet_case(n: int = 2048, n_test: int = 20):
    from fimoda.data import augment_images
    g = torch.Generator().manual_seed(0)
    X = torch.randn(n, 1, 28, 28, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    torch.manual_seed(0)
    model = ResNet9(1, 10, width=16).eval()
    cfg = dict(optimizer="sgd", lr=0.04, weight_decay=1e-3, batch_size=128)
    return ("ResNet-9 (width 16, 28x28x1)", model, X, y, X[:n_test], y[:n_test], cfg,
            functools.partial(augment_images, fill=0.0))


def encoder_case(n: int = 2048, n_test: int = 20, k: int = 3):
    from fimoda.paper.config import get_config
    from fimoda.data import load_dataset
    from fimoda.models import TextTop, build_model
    from fimoda.training import trunk_features
    cfg = get_config("sst2", "cpu")
    ds = load_dataset("sst2", encoder=cfg.encoder)
    clf = build_model(cfg, n_classes=2).eval()
    X = trunk_features(clf, k, torch.as_tensor(ds.X_train[:n]), progress=False)
    Xt = trunk_features(clf, k, torch.as_tensor(ds.X_test[:n_test]), progress=False)
    y = torch.as_tensor(ds.y_train[:n]).long()
    yt = torch.as_tensor(ds.y_test[:n_test]).long()
    model = TextTop(clf, k).eval()
    cfg = dict(optimizer="adamw", lr=1e-6, grad_clip=1.0, batch_size=64)
    return (f"encoder top {k} layers + head (MiniLM-L6, SST-2 sentences)", model, X, y, Xt, yt,
            cfg, None)


def run_case(case, runs: int, steps: int):
    name, model, X, y, Xt, yt, c, augment = case
    loo = torch.arange(runs - 1) * (len(X) // runs)
    gcfg = GoldConfig(seeds=1, max_steps=steps, eval_every=steps, mechanism="subtract",
                      progress=False, **c)
    further_train(model, "classification", X, y, Xt, yt, loo[:1],      # warm-up (vmap tracing)
                  GoldConfig(seeds=1, max_steps=1, eval_every=1, progress=False, **c),
                  augment=augment)
    t0 = time.perf_counter()
    vec = further_train(model, "classification", X, y, Xt, yt, loo, gcfg, augment=augment)
    t_vec = time.perf_counter() - t0
    t0 = time.perf_counter()
    ref = reference_further_train(model, "classification", X, y, Xt, yt, loo, gcfg,
                                  augment=augment)
    t_ref = time.perf_counter() - t0
    diff = max(np.abs(vec.loss_full - ref.loss_full).max(),
               np.abs(vec.loss_loo - ref.loss_loo).max())
    perm = torch.randperm(len(X), generator=torch.Generator().manual_seed(0))[:c["batch_size"]]
    flops = step_flops(model, X[perm], y[perm])
    model_steps = runs * steps
    return name, vec.config["engine"], t_vec, t_ref, model_steps, flops, diff


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=5, help="full run + runs-1 left-out runs")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    rate = matmul_rate()
    print(f"float32 matmul rate (2048^2, best of 5): {rate:.1f} GFLOP/s on {args.threads} threads")
    for make in (resnet_case, encoder_case):
        name, engine, t_vec, t_ref, ms, flops, diff = run_case(make(), args.runs, args.steps)
        print(f"\n{name}: {ms} model-steps, {flops / 1e9:.2f} GFLOP per model-step "
              f"(forward + backward, FlopCounterMode)")
        for label, t in ((f"vectorised ({engine} engine)", t_vec), ("reference loop", t_ref)):
            print(f"  {label:<26} {ms / t:6.2f} model-steps/s  "
                  f"{flops * ms / t / 1e9:6.1f} GFLOP/s = {flops * ms / t / 1e9 / rate:5.1%} of "
                  f"the matmul rate")
        print(f"  speed-up {t_ref / t_vec:.2f}x; max |vectorised - reference| test loss {diff:.1e}")


if __name__ == "__main__":
    main()
