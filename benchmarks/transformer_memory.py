"""Peak resident memory and wall time of one attribution method on all-MiniLM-L6-v2 with a
linear head (every parameter attributed), n SST-2 training sentences, the first n_loo of them
left out, n_test dev sentences: the setting of issue "attribute a real transformer".

The head is fresh (no fine-tuning): memory and time do not depend on the weights' values. One
method per process, so ru_maxrss is that method's peak. ``--inputs packed`` feeds the (N, 2, L)
tensor of :class:`fimoda.models.TextClassifier` (runs on any fimoda version, for before/after
comparisons); ``--inputs dict`` feeds the tokenizer's dict batches to a Hugging Face
BertForSequenceClassification (fimoda.hf). Run from the repository root:

    FIMODA_DATA_DIR=/path/to/data HF_HUB_OFFLINE=1 python benchmarks/transformer_memory.py \\
        --method grad_dot --n 200 [--memory 2e9] [--inputs dict] [--option depth=5 ...]

Where fimoda has :func:`fimoda.estimate_cost`, its estimate (peak bytes, per-example gradients,
Hessian products) is printed beside the measured peak (``estimate``).
"""
from __future__ import annotations

import argparse
import inspect
import json
import os
import resource
import time

import torch


def sentences(n: int, n_test: int):
    import csv
    from pathlib import Path

    import pandas as pd
    root = Path(os.environ["FIMODA_DATA_DIR"]) / "sst2"
    read = lambda f: pd.read_csv(root / f, sep="\t", quoting=csv.QUOTE_NONE,
                                 keep_default_na=False, dtype={"sentence": str})
    tr, dev = read("train.tsv").iloc[:n], read("dev.tsv").iloc[:n_test]
    return list(tr.sentence), torch.tensor(tr.label.values), list(dev.sentence), \
        torch.tensor(dev.label.values)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--method", default="grad_dot")
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--n-loo", type=int, default=20)
    ap.add_argument("--n-test", type=int, default=5)
    ap.add_argument("--memory", type=float, default=None, help="budget in bytes (this branch)")
    ap.add_argument("--proj-dim", type=int, default=512)
    ap.add_argument("--proj-type", default=None)
    ap.add_argument("--inputs", choices=("packed", "dict"), default="packed")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--option", action="append", default=[],
                    help="a method option NAME=VALUE (VALUE read as JSON, else a string)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import fimoda
    from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer
    from fimoda.models import TextClassifier, resolve_encoder
    path = resolve_encoder("sentence-transformers/all-MiniLM-L6-v2")
    tok = AutoTokenizer.from_pretrained(path)
    X_s, y, Xt_s, yt = sentences(args.n, args.n_test)
    torch.manual_seed(0)
    if args.inputs == "dict":
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2).eval()
        X = [dict(tok(X_s[i:i + 64], padding=True, return_tensors="pt"))
             for i in range(0, len(X_s), 64)]
        Xt = dict(tok(Xt_s, padding=True, return_tensors="pt"))
    else:
        enc = AutoModel.from_pretrained(path, attn_implementation="eager")
        model = TextClassifier.from_encoder(enc).eval()
        pack = lambda e: torch.stack([e["input_ids"], e["attention_mask"]], 1)
        X = pack(tok(X_s, padding=True, return_tensors="pt"))
        Xt = pack(tok(Xt_s, padding=True, return_tensors="pt"))
    opts = {}
    if args.method == "trak":
        opts["proj_dim"] = args.proj_dim
        if args.proj_type:
            opts["proj_type"] = args.proj_type
    for item in args.option:
        key, _, value = item.partition("=")
        try:
            opts[key] = json.loads(value)
        except json.JSONDecodeError:
            opts[key] = value
    if args.memory is not None and "memory" in inspect.signature(fimoda.attribute).parameters:
        opts["memory"] = int(args.memory)
    estimate = None
    if hasattr(fimoda, "estimate_cost"):
        cost = fimoda.estimate_cost(model, X, y, range(args.n_loo), Xt, yt,
                                    task="classification", method=args.method, **opts)
        estimate = dict(peak_gb=round(cost.peak_bytes / 2 ** 30, 3), line=cost.line())
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t = time.perf_counter()
    scores = fimoda.attribute(model, X, y, range(args.n_loo), Xt, yt, task="classification",
                              method=args.method, **opts)
    wall = time.perf_counter() - t
    print(json.dumps(dict(
        method=args.method, n=args.n, inputs=args.inputs, options=opts,
        fimoda=os.path.dirname(fimoda.__file__), params=sum(p.numel() for p in model.parameters()),
        rss_before_gb=round(rss0 / 2 ** 20, 2),
        peak_rss_gb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20, 2),
        wall_s=round(wall, 1), scores_shape=list(scores.shape), estimate=estimate,
        load_avg=os.getloadavg()[0])))


if __name__ == "__main__":
    main()
