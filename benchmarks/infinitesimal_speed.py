"""Speed of the infinitesimal gold standard (jvp through every step, one tangent per left-out
instance) against the finite further-training engine, on identical work.

Identical work: the same 2x128 ReLU MLP (Concrete's shape: 8 inputs, 927 training rows, 103 test
rows, synthetic unless ``--data`` loads Concrete), float64, SGD at lr 3e-2, batch 128, the
``subtract`` mechanism, the same seeds, epochs and ``--n-loo`` left-out instances. The finite
engine (``fimoda.gold.further_train``, mlp engine) trains the full run and n' left-out runs; the
infinitesimal one (``fimoda.gold.infinitesimal.infinitesimal_further_train``) trains the full
run and carries n' tangents. Both answer the same question (the effect of each left-out
instance at every evaluation point), so both are counted as (n' + 1) model-steps per step.
Prints model-steps/s of each and their ratio, and the agreement of the two gold scores.

Run:  python benchmarks/infinitesimal_speed.py [--threads 2] [--n-loo 50] [--epochs 2]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from fimoda.gold import GoldConfig, further_train, gold_scores  # noqa
from fimoda.gold.infinitesimal import infinitesimal_further_train  # noqa
from fimoda.models import MLP  # noqa


def data(use_concrete: bool):
    if use_concrete:
        from fimoda.data import load_dataset
        ds = load_dataset("concrete")
        return (np.asarray(ds.X_train, np.float64), np.asarray(ds.y_train, np.float64),
                np.asarray(ds.X_test, np.float64), np.asarray(ds.y_test, np.float64), "concrete")
    g = np.random.default_rng(0)
    X, Xt = g.normal(size=(927, 8)), g.normal(size=(103, 8))
    w = g.normal(size=8)
    return X, np.sin(X @ w), Xt, np.sin(Xt @ w), "synthetic (Concrete's shape)"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--n-loo", type=int, default=50)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--optimizer", default="sgd", choices=("sgd", "adam", "adamw"))
    ap.add_argument("--data", action="store_true", help="Concrete from FIMODA_DATA_DIR")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    X, y, Xt, yt, name = data(a.data)
    torch.manual_seed(0)
    model = MLP(X.shape[1], 1, hidden=128).double()
    loo = np.arange(0, 9 * a.n_loo, 9) % len(X)
    cfg = GoldConfig(optimizer=a.optimizer, lr=3e-2 if a.optimizer == "sgd" else 1e-4,
                     epochs=a.epochs, batch_size=128, seeds=a.seeds, mechanism="subtract",
                     progress=False, workers=a.threads)
    steps = a.seeds * a.epochs * -(-len(X) // 128)
    work = (a.n_loo + 1) * steps
    infinitesimal_further_train(model, "regression", X, y, Xt, yt, loo[:2],
                                GoldConfig(**{**cfg.__dict__, "epochs": 1}))      # warm-up
    t0 = time.perf_counter()
    fin = further_train(model, "regression", X, y, Xt, yt, loo, cfg)
    t_fin = time.perf_counter() - t0
    t0 = time.perf_counter()
    inf = infinitesimal_further_train(model, "regression", X, y, Xt, yt, loo, cfg)
    t_inf = time.perf_counter() - t0
    a_f = gold_scores(fin.loss_full, fin.loss_loo)[:, 1:]
    a_i = gold_scores(inf.loss_full, inf.loss_loo)[:, 1:]
    cos = [float(np.mean([np.dot(a_f[:, t, j], a_i[:, t, j]) / (np.linalg.norm(a_f[:, t, j])
                                                                 * np.linalg.norm(a_i[:, t, j]))
                          for j in range(a_f.shape[2])])) for t in range(a_f.shape[1])]
    print(f"data: {name}; {a.optimizer}, {a.n_loo} left-out instances, {a.seeds} seed(s) x "
          f"{a.epochs} epoch(s) = {steps} steps, {a.threads} thread(s)")
    print(f"finite engine ({fin.config['engine']}): {work / t_fin:9.1f} model-steps/s")
    print(f"infinitesimal (jvp):  {work / t_inf:9.1f} model-steps/s")
    print(f"ratio finite / infinitesimal: {t_inf / t_fin:.1f}x")
    print(f"cosine infinitesimal vs finite subtract gold per epoch: "
          + ", ".join(f"{c:.4f}" for c in cos))


if __name__ == "__main__":
    main()
