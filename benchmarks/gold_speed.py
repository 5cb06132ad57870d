"""Speed of the vectorised further-training gold standard against one-model-at-a-time loops.

On identical work (Concrete, or same-shaped synthetic data when the data layer is unavailable;
2x128 ReLU MLP, float64, batch 128, n' left-out runs + the full run, a few seeds and epochs,
``--mechanism`` subtract (default) or remove, SGD), in one process:

- vectorised: ``fimoda.gold.further_train`` (best of ``--repeats``);
- reference: ``reference_further_train`` (nn.Module + torch.optim, one run at a time);
- paper-style: a loop written the way the paper's code is (nn.Module, TensorDataset, DataLoader
  with a seeded RandomSampler, torch.optim.SGD, per-epoch test evaluation through a sequential
  DataLoader); ``subtract`` subtracts L(z_i)/n from each batch loss, ``remove`` drops i from
  the sampler's order (as the paper's tabular code does);

the two loops are timed on the full run + ``--ref-runs`` left-out runs of the first seed and
compared numerically with the vectorised results for the same runs. The machine's float64
matmul rate is measured with a large matmul in the same process. FLOPs per model-step
(forward + backward of one model on one batch) are counted as

    6 x B x sum_layers (in x out)      (2 B in out forward, 4 B in out for dW and dX backward)

Then (``--dask-workers``, default 2; 0 skips it) the same gold work, cut into (seed, chunk)
pieces of ``--dask-chunk`` runs, serially and as tasks of a ``dask.distributed`` LocalCluster of
that many single-threaded worker processes, in one run: wall times, the ratio, the cluster's
start-up, the per-task compute time (from the task stream) and the overhead per task,
``(workers x wall - sum of task compute times) / tasks``; then an EXTRAPOLATION (not a
measurement) of the paper profile's gold standard for the dataset on N workers (GPUs when run
with ``--device cuda``) from the measured cost per run-step and per task.

Run:  python benchmarks/gold_speed.py [--threads 2] [--seeds 2] [--epochs 3] [--n-loo 100]
"""
from __future__ import annotations

import argparse
import copy
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, RandomSampler, SequentialSampler, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from fimoda.gold import GoldConfig, further_train, reference_further_train  # noqa
from fimoda.models import MLP  # noqa


def load_data(name: str, data_dir: str | None):
    try:
        from fimoda.data import load_dataset
        ds = load_dataset(name, data_dir=data_dir)
        return (np.asarray(ds.X_train, np.float64), np.asarray(ds.y_train, np.float64),
                np.asarray(ds.X_test, np.float64), np.asarray(ds.y_test, np.float64), name)
    except Exception as e:  # the data layer is optional here
        print(f"NOTE: could not load {name!r} ({type(e).__name__}: {e}); using synthetic data "
              "of Concrete's shape (927 x 8 train, 103 test)")
        g = np.random.default_rng(0)
        X, Xt = g.normal(size=(927, 8)), g.normal(size=(103, 8))
        w = g.normal(size=8)
        return X, np.sin(X @ w) + 0.1 * g.normal(size=927), Xt, np.sin(Xt @ w), "synthetic"


def matmul_rate(size: int, repeats: int = 5) -> float:
    """Best float64 GFLOP/s of a size x size matmul."""
    a = torch.randn(size, size, dtype=torch.float64)
    b = torch.randn(size, size, dtype=torch.float64)
    a @ b
    best = math.inf
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * size ** 3 / best / 1e9


def final_model(X, y, epochs: int = 30, lr: float = 0.1) -> MLP:
    """A stand-in theta^f: the MLP at seed 0 after a short plain-SGD training."""
    torch.manual_seed(0)
    m = MLP(X.shape[1], 1).double()
    g = torch.Generator().manual_seed(0)
    for _ in range(epochs):
        for idx in torch.randperm(len(X), generator=g).split(128):
            loss = ((m(X[idx]).squeeze(1) - y[idx]) ** 2).mean()
            grads = torch.autograd.grad(loss, list(m.parameters()))
            with torch.no_grad():
                for p, gr in zip(m.parameters(), grads):
                    p.sub_(gr, alpha=lr)
    return m.eval()


def warm_up():
    """The first torch.optim step imports torch._dynamo (seconds): do it before any timing."""
    p = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.SGD([p], lr=0.1)
    (p ** 2).sum().backward()
    opt.step()
    for _ in DataLoader(TensorDataset(torch.zeros(4)), batch_size=2,
                        sampler=RandomSampler(range(4), generator=torch.Generator())):
        pass


class LeaveOneOutSampler(RandomSampler):
    """RandomSampler's order with one index dropped (the ``remove`` mechanism)."""

    def __init__(self, data, leave_out, generator):
        super().__init__(data, generator=generator)
        self.leave_out = leave_out

    def __iter__(self):
        return (j for j in super().__iter__() if j != self.leave_out)


def paper_style_loop(model, X, y, Xt, yt, runs, seed, lr, epochs, batch_size, mechanism):
    """Test losses (len(runs), epochs + 1, J), one run at a time, the way the paper's code is
    written; ``runs`` holds None (full) or a left-out index."""
    train = TensorDataset(X, y)
    test_loader = DataLoader(TensorDataset(Xt, yt), batch_size=batch_size,
                             sampler=SequentialSampler(range(len(Xt))))
    n = len(X)
    out = np.empty((len(runs), epochs + 1, len(Xt)))

    def test_per_sample(m):
        m.eval()
        losses = torch.tensor([], dtype=X.dtype)
        with torch.no_grad():
            for xb, yb in test_loader:
                losses = torch.cat((losses, F.mse_loss(m(xb).squeeze(1), yb, reduction="none")))
        return losses.numpy()

    for r, i in enumerate(runs):
        g = torch.Generator()
        g.manual_seed(seed)
        if mechanism == "remove" and i is not None:
            sampler = LeaveOneOutSampler(train, i, g)
        else:
            sampler = RandomSampler(train, generator=g)
        loader = DataLoader(train, batch_size=batch_size, sampler=sampler)
        m = copy.deepcopy(model)
        opt = torch.optim.SGD(m.parameters(), lr=lr)
        out[r, 0] = test_per_sample(m)
        for t in range(epochs):
            m.eval()   # no train/eval-mode layers in the MLP; kept as in the further training
            for xb, yb in loader:
                loss = F.mse_loss(m(xb).squeeze(1), yb)
                if i is not None and mechanism == "subtract":
                    loss = loss - F.mse_loss(m(X[i:i + 1]).squeeze(1), y[i:i + 1],
                                             reduction="sum") / n
                opt.zero_grad()
                loss.backward()
                opt.step()
            out[r, t + 1] = test_per_sample(m)
    return out


def dask_row(model, X, y, Xt, yt, loo, cfg, args, name):
    """Serial vs a LocalCluster on the same pieces, and the paper-profile extrapolation."""
    import dataclasses
    import tempfile
    from distributed import get_task_stream
    from fimoda.paper.config import get_config
    from fimoda.gold import distributed as dd
    cfg = dataclasses.replace(cfg, max_runs_per_chunk=args.dask_chunk, device=args.device)
    runs = len(loo) + 1
    n_tasks = args.seeds * math.ceil(runs / args.dask_chunk)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)     # serial: blocks on one thread per core; tasks: one thread each
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        ser = further_train(model, "regression", X, y, Xt, yt, loo, cfg, workdir=f"{tmp}/serial")
        serial_s = time.perf_counter() - t
        t = time.perf_counter()
        with dd.cluster_client(workers=args.dask_workers) as client:
            start_s = time.perf_counter() - t
            t = time.perf_counter()
            with get_task_stream(client) as ts, dd.on_dask(client, progress=False, threads=1):
                res = further_train(model, "regression", X, y, Xt, yt, loo, cfg,
                                    workdir=f"{tmp}/dask")
            dask_s = time.perf_counter() - t
        tasks = [r for r in ts.data if "fimoda-gold" in str(r["key"])]
        compute = [sum(s["stop"] - s["start"] for s in r["startstops"]
                       if s["action"] == "compute") for r in tasks]
    torch.set_num_threads(threads)
    same = all(np.array_equal(getattr(ser, k), getattr(res, k))
               for k in ("loss_full", "loss_loo", "param_dist", "param_dist_loo"))
    task_s = float(np.mean(compute))
    overhead = (args.dask_workers * dask_s - sum(compute)) / len(compute)
    print(f"dask: {n_tasks} pieces of {args.dask_chunk} runs ({args.seeds} seeds x "
          f"{math.ceil(runs / args.dask_chunk)} chunks), device {args.device}: serial "
          f"{serial_s:.2f} s (one intra-op thread, {os.cpu_count()} block threads), "
          f"LocalCluster of {args.dask_workers} single-threaded workers {dask_s:.2f} s "
          f"(+ {start_s:.1f} s to start it) -> {serial_s / dask_s:.2f}x the serial speed; "
          f"arrays bit-identical: {same}")
    print(f"dask: per task {task_s:.3f} s compute (mean of {len(compute)}; min "
          f"{min(compute):.3f}, median {np.median(compute):.3f}, max {max(compute):.3f}; serial "
          f"{serial_s / n_tasks:.3f} s per piece on {os.cpu_count()} block threads), overhead per task "
          f"{overhead * 1e3:.0f} ms = (workers x wall - sum of compute) / tasks")
    steps_epoch = math.ceil(len(X) / cfg.batch_size)
    run_step_s = sum(compute) / (args.seeds * runs * cfg.epochs * steps_epoch)
    paper = get_config(args.dataset if name != "synthetic" else "concrete", "paper").further
    p_runs, chunk = paper.n_loo + 1, args.dask_chunk
    p_tasks = paper.seeds * math.ceil(p_runs / chunk)
    p_task_s = chunk * paper.epochs * steps_epoch * run_step_s + max(overhead, 0.0)
    print(f"EXTRAPOLATION (not measured): the paper profile's gold standard for {name} "
          f"({paper.seeds} seeds x {p_runs} runs x {paper.epochs} epochs x {steps_epoch} "
          f"steps) as {p_tasks} pieces of {chunk} runs, each {p_task_s:.1f} s at this run's "
          f"cost per run-step ({run_step_s * 1e6:.1f} us on one {args.device} worker) plus "
          f"the overhead per task:")
    print("  " + "; ".join(f"N={n}: {_clock_h(math.ceil(p_tasks / n) * p_task_s)}"
                           for n in (1, 2, 4, 8, 16, 64)) +
          ("  (N workers like this run's; on GPUs rerun with --device cuda on a GPU machine "
           "to measure their cost per run-step)" if args.device == "cpu" else
           f"  (N GPUs like this run's {args.device})"))


def _clock_h(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.1f} min"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dataset", default="concrete")
    ap.add_argument("--data-dir", default=os.environ.get("FIMODA_DATA_DIR"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--n-loo", type=int, default=100)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=3e-2)
    ap.add_argument("--mechanism", default="subtract", choices=["subtract", "remove"])
    ap.add_argument("--run-block", type=int, default=None, help="runs per block (mlp engine)")
    ap.add_argument("--engine", default="auto", choices=["auto", "mlp", "func"])
    ap.add_argument("--ref-runs", type=int, default=5,
                    help="left-out runs (plus the full run) timed in the two loops")
    ap.add_argument("--repeats", type=int, default=3, help="vectorised timing: best of")
    ap.add_argument("--matmul-size", type=int, default=2048)
    ap.add_argument("--dask-workers", type=int, default=2,
                    help="LocalCluster workers of the Dask row (0: no Dask row)")
    ap.add_argument("--dask-chunk", type=int, default=10, help="runs per piece in the Dask row")
    ap.add_argument("--device", default="cpu", help="device of the Dask row's pieces")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    load0 = os.getloadavg()

    Xn, yn, Xtn, ytn, name = load_data(args.dataset, args.data_dir)
    X, y = torch.as_tensor(Xn), torch.as_tensor(yn)
    Xt, yt = torch.as_tensor(Xtn), torch.as_tensor(ytn)
    n, B = len(X), args.batch_size
    stride = max(1, (n - 1) // args.n_loo)
    loo = np.arange(0, stride * args.n_loo, stride)[:args.n_loo]
    model = final_model(X, y)
    dims = [(lin.in_features, lin.out_features) for lin in list(model.hidden) + [model.out]]
    flops_step = 6 * B * sum(a * b for a, b in dims)
    k = math.ceil(n / B)
    print(f"data: {name}, n={n}, d={X.shape[1]}, test={len(Xt)}, n'={len(loo)}, seeds="
          f"{args.seeds}, epochs={args.epochs}, batch={B} ({k} steps/epoch), float64, "
          f"{args.mechanism}, SGD lr={args.lr}, torch threads={torch.get_num_threads()}")
    print(f"FLOPs per model-step = 6 x B x sum(in x out) = 6 x {B} x "
          f"{sum(a * b for a, b in dims)} = {flops_step / 1e6:.2f} MFLOP")

    warm_up()
    rate = matmul_rate(args.matmul_size)
    print(f"float64 matmul rate ({args.matmul_size}^2, best of 5): {rate:.1f} GFLOP/s "
          f"-> FLOP floor {flops_step / rate / 1e6:.3f} ms per model-step")

    cfg = GoldConfig(optimizer="sgd", lr=args.lr, epochs=args.epochs, batch_size=B,
                     mechanism=args.mechanism, seeds=args.seeds, engine=args.engine,
                     run_block=args.run_block, progress=False)
    times = []
    for _ in range(args.repeats):
        t = time.perf_counter()
        res = further_train(model, "regression", X, y, Xt, yt, loo, cfg)
        times.append(time.perf_counter() - t)
    vec_steps = args.seeds * (len(loo) + 1) * args.epochs * k
    vec_ms = min(times) / vec_steps * 1e3
    print(f"vectorised ({res.config['engine']} engine, run block {res.config['run_block']}, "
          f"chunk {res.config['chunk_runs']}): {min(times):.2f} s best of "
          f"{['%.2f' % t for t in times]} for {vec_steps} model-steps -> {vec_ms:.3f} ms per "
          f"model-step, {1e3 / vec_ms:.0f} model-steps/s, {flops_step / vec_ms / 1e6:.1f} "
          f"GFLOP/s = {flops_step / vec_ms / 1e6 / rate:.0%} of the matmul rate")

    sub = loo[:args.ref_runs]
    ref_cfg = GoldConfig(optimizer="sgd", lr=args.lr, epochs=args.epochs, batch_size=B,
                         mechanism=args.mechanism, seeds=[1], progress=False)
    loop_steps = (len(sub) + 1) * args.epochs * k
    t = time.perf_counter()
    ref = reference_further_train(model, "regression", X, y, Xt, yt, sub, ref_cfg)
    ref_ms = (time.perf_counter() - t) / loop_steps * 1e3
    d_ref = max(np.abs(ref.loss_loo[0] - res.loss_loo[0, :len(sub)]).max(),
                np.abs(ref.loss_full[0] - res.loss_full[0]).max())
    print(f"reference loop (nn.Module + torch.optim): {ref_ms:.3f} ms per model-step; "
          f"max |loss difference| to vectorised = {d_ref:.2e}")

    t = time.perf_counter()
    pap = paper_style_loop(model, X, y, Xt, yt, [None] + sub.tolist(), 1, args.lr, args.epochs,
                           B, args.mechanism)
    pap_ms = (time.perf_counter() - t) / loop_steps * 1e3
    d_pap = max(np.abs(pap[1:] - res.loss_loo[0, :len(sub)]).max(),
                np.abs(pap[0] - res.loss_full[0]).max())
    print(f"paper-style loop (DataLoader + RandomSampler + torch.optim): {pap_ms:.3f} ms "
          f"per model-step; max |loss difference| to vectorised = {d_pap:.2e}")
    effect = np.abs(res.loss_loo[:, :, -1] - res.loss_full[:, None, -1]).max()
    print(f"(size of the LOO effects compared against: max |loss_loo - loss_full| = {effect:.2e})")
    print(f"speed-up vs reference loop: {ref_ms / vec_ms:.1f}x")
    print(f"speed-up vs paper-style loop: {pap_ms / vec_ms:.1f}x")
    floor_ms = flops_step / rate / 1e6
    need = flops_step / (pap_ms / 20) / 1e6
    print(f"ceiling: even at 100% of the measured matmul rate ({floor_ms:.3f} ms per model-step) "
          f"the vectorised path would be at most {pap_ms / floor_ms:.1f}x the paper-style loop "
          f"measured here; 20x would need {need:.0f} GFLOP/s = {need / rate:.0%} of the rate")
    if args.dask_workers > 0:
        dask_row(model, X, y, Xt, yt, loo, cfg, args, name)
    load1 = os.getloadavg()
    print(f"load average at start {load0[0]:.2f}, at end {load1[0]:.2f} on {os.cpu_count()} "
          f"cores" + ("  (other processes were running: timings may be disturbed)"
                      if max(load0[0], load1[0]) > args.threads + 0.5 else ""))


if __name__ == "__main__":
    main()
