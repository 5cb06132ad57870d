"""Float32 against float64 for the SST-2 gold standard (issue: gold differences there are ~1e-9).

The same small gold standard -- the encoder's top layer + head on the frozen trunk's features of
SST-2 sentences, AdamW lr 1e-6, batch 64, clip 1, `subtract`, dropout off -- is run once with the
model and features in float64 and once in float32, from the same theta^f (the float64 one rounded).
Printed: the size of the eq. (13) scores, the float32 error relative to them, and the cosine between
the two gold vectors per test point (mean, min). A cosine near 1 means float32 is enough.

    python benchmarks/text_gold_precision.py [--n-train 16000]

With ``--profile P`` it runs instead the profile's own SST-2 gold standard -- its theta^f (the
encoder's top layers on the frozen trunk's features), left-out and test instances, seeds and
steps -- in float32 and float64, and prints the noise ceiling of each beside their cosine, as
``image_gold_precision.py --dataset sst2 --profile P`` (which it calls; ``--threads``, ``--seeds``,
``--steps`` are passed on):

    FIMODA_DATA_DIR=... python benchmarks/text_gold_precision.py --profile cpu --threads 1
"""
from __future__ import annotations

import copy
import dataclasses
import os
import time

import numpy as np
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from fimoda.paper import experiment as ex                                   # noqa: E402
from fimoda.paper.config import get_config                                  # noqa: E402
from fimoda.gold import GoldConfig, further_train, gold_scores  # noqa: E402
from fimoda.models import TextTop, build_model                        # noqa: E402
from fimoda.training import trunk_features                               # noqa: E402

N_LOO, N_TEST, SEEDS, STEPS, K = 8, 8, 2, 10, 1


def main(argv=None):
    import argparse
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n-train", type=int, default=16000,
                    help="training sentences (the subtracted term is L(z_i)/n): the cpu profile's")
    ap.add_argument("--profile", default=None,
                    help="run the profile's own SST-2 gold standard instead (module docstring)")
    args, rest = ap.parse_known_args(argv)
    if args.profile is not None:
        from image_gold_precision import main as profile_gold_precision   # benchmarks/ is on the path
        return profile_gold_precision(["--dataset", "sst2", "--profile", args.profile, *rest])
    if rest:
        ap.error(f"unrecognized arguments: {' '.join(rest)} (--threads, --seeds, --steps go with "
                 f"--profile)")
    N_TRAIN = args.n_train
    cfg = get_config("sst2", "paper", dtype="float64")
    ds = ex.load_data(cfg)
    clf = build_model(cfg, n_classes=2).eval()
    torch.manual_seed(0)
    X = torch.as_tensor(ds.X_train[:N_TRAIN])
    Xt = torch.as_tensor(ds.X_test[:N_TEST])
    F64, Ft64 = trunk_features(clf, K, X, progress=False), trunk_features(clf, K, Xt, progress=False)
    y, yt = torch.as_tensor(ds.y_train[:N_TRAIN]).long(), torch.as_tensor(ds.y_test[:N_TEST]).long()
    loo = torch.arange(0, N_TRAIN, N_TRAIN // N_LOO)[:N_LOO]
    gcfg = GoldConfig.from_experiment(cfg.further, optimizer="adamw", mechanism="subtract",
                                      seeds=SEEDS, max_steps=STEPS, eval_every=5)
    out = {}
    for name, dt in (("float64", torch.float64), ("float32", torch.float32)):
        top = copy.deepcopy(TextTop(clf, K)).to(dt).eval()
        t0 = time.perf_counter()
        r = further_train(top, "classification", F64.to(dt), y, Ft64.to(dt), yt, loo,
                          dataclasses.replace(gcfg, progress=False))
        out[name] = gold_scores(r.loss_full, r.loss_loo, adjust="mean")[:, -1, :]   # (i, j)
        print(f"{name}: {time.perf_counter() - t0:.1f} s", flush=True)
    a, b = out["float64"], out["float32"]
    cos = (a * b).sum(0) / (np.linalg.norm(a, axis=0) * np.linalg.norm(b, axis=0))
    print(f"n = {N_TRAIN} training sentences, {N_LOO} left out, {N_TEST} test, {SEEDS} seeds, "
          f"{STEPS} steps")
    print(f"eq. (13) scores (float64): max |a| = {np.abs(a).max():.3e}, "
          f"mean |a| = {np.abs(a).mean():.3e}")
    print(f"float32 - float64: max |diff| = {np.abs(a - b).max():.3e} "
          f"({np.abs(a - b).max() / np.abs(a).max():.2%} of max |a|)")
    print(f"cosine(float32, float64) over the left-out set, per test point: mean {cos.mean():.4f}, "
          f"min {cos.min():.4f}")


if __name__ == "__main__":
    main()
