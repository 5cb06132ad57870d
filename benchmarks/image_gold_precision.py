"""Float32 against float64 for the image gold standard (ResNet-9, the `subtract` mechanism).

The gold standard of a profile's image dataset -- its theta^f, left-out and test instances, seeds
and further-training settings -- is run twice by the vectorised engine from the same theta^f:
in float32 (the profile's precision) and with the model and images cast to float64. Printed:
the size of the eq. (13) scores at the last evaluation point, the float32 error relative to
them, and the cosine between the float32 and float64 gold vectors over the left-out set per
test point (mean, min). A cosine near 1 means float32 is enough; the subtracted term is
L(z_i)/n, so the float32 error relative to the scores grows with n.

    FIMODA_DATA_DIR=... python benchmarks/image_gold_precision.py [--dataset fashion_mnist] [--profile cpu]

Needs the profile's final model (notebook 01 of the pipeline; its results directory, e.g.
``FIMODA_RESULTS_DIR``). One run; nothing is written.
"""
from __future__ import annotations

import argparse
import copy
import time

import numpy as np
import torch

from fimoda import experiment as ex
from fimoda.config import get_config
from fimoda.gold import GoldConfig, further_train, gold_scores


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dataset", default="fashion_mnist")
    ap.add_argument("--profile", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    cfg = get_config(a.dataset, a.profile)
    model, ds = ex.final_model(cfg)
    loo_idx = ex.select_loo_indices(cfg, len(ds.X_train))
    test_idx = ex.select_test_indices(cfg, len(ds.X_test))
    X, Y, Xt, Yt = ex.tensors(ds, cfg, "cpu")
    t = torch.as_tensor(test_idx)
    gcfg = GoldConfig.from_experiment(cfg.further, progress=False)
    gold = {}
    for dt in (torch.float32, torch.float64):
        t0 = time.perf_counter()
        res = further_train(copy.deepcopy(model).to(dt), cfg.task, X.to(dt), Y, Xt[t].to(dt),
                            Yt[t], torch.as_tensor(loo_idx), gcfg,
                            augment=ex.gold_augment(cfg, ds), test_indices=np.asarray(test_idx))
        gold[dt] = gold_scores(res.loss_full, res.loss_loo, "mean")[:, -1].T   # (J, n'), eq. 13
        print(f"{str(dt):14s} {time.perf_counter() - t0:6.1f} s", flush=True)
    g32, g64 = gold[torch.float32], gold[torch.float64]
    cos = (g32 * g64).sum(1) / (np.linalg.norm(g32, axis=1) * np.linalg.norm(g64, axis=1))
    err = np.abs(g32 - g64).max()
    print(f"{a.dataset} [{a.profile}]: n = {len(X):,}, |L| = {len(loo_idx)}, {len(test_idx)} test "
          f"points, {gcfg.optimizer} lr {gcfg.lr:g}, {gcfg.mechanism}, "
          f"{len(gcfg.seed_list)} seeds, {res.eval_points[-1]} {res.eval_unit}s")
    print(f"largest |eq. 13 score| (float64): {np.abs(g64).max():.3e}; largest float32 error: "
          f"{err:.3e} ({100 * err / np.abs(g64).max():.1f} % of it)")
    print(f"cosine float32 vs float64 gold per test point: mean {cos.mean():.4f}, "
          f"min {cos.min():.4f}")


if __name__ == "__main__":
    main()
