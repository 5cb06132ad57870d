"""Float32 against float64 for the gold standard of a profile's image (or text) dataset, and what
round-off does to its noise ceiling.

The gold standard of a profile's dataset -- its theta^f, left-out and test instances, seeds and
further-training settings -- is run twice by the vectorised engine from the same theta^f: in
float32 (the profile's precision) and with the model and inputs cast to float64. Printed:

- the size of the eq. (13) scores at the last evaluation point and the float32 error relative to
  them;
- one seed's gold (eq. 13 over the left-out set, per test point): the float32 error relative to
  the float64 vector, against the difference between two seeds in float64 (seed noise);
- per evaluation point, over test points: the cosine between the float32 and float64 gold
  vectors (mean, min), and the noise ceiling of each (``fimoda.yardsticks.noise_ceiling``: the
  cosine the exact answer would reach against the gold; mean over test points);
- per test point at the last evaluation point: the cosine float32 vs float64 and the two
  ceilings.

A float32 ceiling well below the float64 one means round-off, which differs from seed to seed
with the batch order, is being counted as seed noise. The subtracted term is L(z_i)/n, so the
float32 error relative to the scores grows with n.

    FIMODA_DATA_DIR=... python benchmarks/image_gold_precision.py [--dataset fashion_mnist]
        [--profile cpu] [--threads 1] [--seeds K] [--steps N]

Needs the profile's final model (notebook 01 of the pipeline; its results directory, e.g.
``FIMODA_RESULTS_DIR``; for text also the frozen trunk's features of notebook 02). Use the
thread count the pipeline ran with (``--jobs 2`` on 2 cores: 1), so that the float32 run is the
pipeline's own gold standard. One run; nothing is written but, with ``--save FILE``, the loss
arrays of both runs (``loss_full_float32``, ``loss_loo_float64``, ..., ``eval_points``) as npz.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import time

import numpy as np
import torch

from fimoda.paper import experiment as ex
from fimoda.paper.config import get_config
from fimoda.paper.experiment.gold_runs import gold_config
from fimoda.gold import GoldConfig, further_train, gold_scores
from fimoda.yardsticks import noise_ceiling


def per_test_cosine(a, b):
    """Cosine over the left-out set (axis 0) per remaining index."""
    return (a * b).sum(0) / (np.linalg.norm(a, axis=0) * np.linalg.norm(b, axis=0))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dataset", default="fashion_mnist")
    ap.add_argument("--profile", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seeds", type=int, default=None, help="default: the profile's")
    ap.add_argument("--steps", type=int, default=None,
                    help="further-training steps (default: the profile's max_steps)")
    ap.add_argument("--save", default=None, help="npz file for both runs' loss arrays")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    cfg = get_config(a.dataset, a.profile)
    model, ds = ex.final_model(cfg)
    loo_idx = ex.select_loo_indices(cfg, len(ds.X_train))
    test_idx = ex.select_test_indices(cfg, len(ds.X_test))
    X, Y, Xt, Yt = ex.tensors(ds, cfg, "cpu")
    t = torch.as_tensor(test_idx)
    gcfg = gold_config(cfg, cfg.further.optimizer, cfg.further.mechanism, progress=False)
    if a.seeds is not None:
        gcfg = dataclasses.replace(gcfg, seeds=a.seeds)
    if a.steps is not None:
        gcfg = dataclasses.replace(gcfg, max_steps=a.steps)
    res = {}
    for dt in (torch.float32, torch.float64):
        t0 = time.perf_counter()
        res[dt] = further_train(copy.deepcopy(model).to(dt), cfg.task, X.to(dt), Y, Xt[t].to(dt),
                                Yt[t], torch.as_tensor(loo_idx), gcfg,
                                augment=ex.gold_augment(cfg, ds), test_indices=np.asarray(test_idx))
        print(f"{str(dt):14s} {time.perf_counter() - t0:6.1f} s", flush=True)
    r32, r64 = res[torch.float32], res[torch.float64]
    if a.save:
        np.savez(a.save, eval_points=r64.eval_points, **{f"{k}_{n}": getattr(r, k)
                 for n, r in (("float32", r32), ("float64", r64))
                 for k in ("loss_full", "loss_loo")})
    print(f"{a.dataset} [{a.profile}]: n = {len(X):,}, |L| = {len(loo_idx)}, {len(test_idx)} test "
          f"points, {gcfg.optimizer} lr {gcfg.lr:g}, {gcfg.mechanism}, {len(gcfg.seed_list)} "
          f"seeds, {r64.eval_points[-1]} {r64.eval_unit}s, {a.threads} thread(s)")
    summarise(r32, r64, test_idx)


def summarise(r32, r64, test_idx):
    """Print the comparison of the float32 and float64 gold standards ``r32``, ``r64``
    (:class:`fimoda.gold.GoldResult` of the same work) over the test points ``test_idx``."""
    S = r64.loss_full.shape[0]
    g32 = gold_scores(r32.loss_full, r32.loss_loo, "mean")            # (n', T, J), eq. 13
    g64 = gold_scores(r64.loss_full, r64.loss_loo, "mean")
    big, err = np.abs(g64[:, -1]).max(), np.abs(g32[:, -1] - g64[:, -1]).max()
    print(f"largest |eq. 13 score| at the last point (float64): {big:.3e}; largest float32 error: "
          f"{err:.3e} ({100 * err / big:.1f} % of it)")
    one = [gold_scores(r.loss_full, r.loss_loo, "mean", seeds=[0])[:, -1] for r in (r32, r64)]
    rel = np.linalg.norm(one[0] - one[1], axis=0) / np.linalg.norm(one[1], axis=0)
    line = (f"one seed's gold at the last point, per test point: |float32 - float64| / |float64| "
            f"mean {rel.mean():.3e} (max {rel.max():.3e})")
    if S > 1:
        other = gold_scores(r64.loss_full, r64.loss_loo, "mean", seeds=[1])[:, -1]
        seed = np.linalg.norm(other - one[1], axis=0) / np.linalg.norm(one[1], axis=0)
        line += f"; another seed's float64 gold differs by {seed.mean():.3e} of it"
    print(line)
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = per_test_cosine(g32, g64)                               # (T, J)
    loo32 = np.asarray(r32.loss_loo)
    moved = (loo32 != loo32[:, :1]).any((0, 1))                      # (T, J): any run differs
    cos = np.where(moved, cos, np.nan)        # float32 gold of rounding residues only: no cosine
    if not moved[-1].all():
        print(f"{(~moved[-1]).sum()} of {len(test_idx)} test points: in float32 no left-out run "
              f"changed their test loss at the last point (gold of rounding residues), no cosine")
    nc = {n: noise_ceiling(r.loss_full, r.loss_loo, "mean", r.eval_points) if S > 1 else None
          for n, r in (("f32", r32), ("f64", r64))}
    if S < 2:
        print("one seed: no noise ceiling")
    mean = {n: c.mean()[0] if c is not None else np.full(len(r64.eval_points), np.nan)
            for n, c in nc.items()}
    print(f"{'eval point':>10s} {'cos mean':>9s} {'cos min':>8s} {'ceil f32':>9s} {'ceil f64':>9s}")
    for k, p in enumerate(r64.eval_points):
        if k == 0 and p == 0:
            continue                                                  # theta^f: no scores
        print(f"{int(p):10d} {np.nanmean(cos[k]):9.4f} {np.nanmin(cos[k]):8.4f} "
              f"{mean['f32'][k]:9.4f} {mean['f64'][k]:9.4f}")
    print("per test point at the last evaluation point:")
    print(f"{'test':>6s} {'cos f32 vs f64':>15s} {'ceil f32':>9s} {'ceil f64':>9s}")
    for j, idx in enumerate(test_idx):
        c = {n: v.ceiling[-1, j] if v is not None else np.nan for n, v in nc.items()}
        print(f"{int(idx):6d} {cos[-1, j]:15.4f} {c['f32']:9.4f} {c['f64']:9.4f}")
    print(f"cosine float32 vs float64 gold per test point (last point): mean "
          f"{np.nanmean(cos[-1]):.4f}, min {np.nanmin(cos[-1]):.4f}; mean noise ceiling float32 "
          f"{mean['f32'][-1]:.4f}, float64 {mean['f64'][-1]:.4f}")

if __name__ == "__main__":
    main()
