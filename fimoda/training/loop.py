"""How theta^f is trained, whatever saves or reuses it: the choices the paper leaves open, per
model family (:data:`PROCEDURE`, recorded with the model), the optimiser and learning-rate
schedule, the training loop shared by every family (:func:`fit_model`), and the metrics of a model
on a dataset (:func:`evaluate`). :mod:`fimoda.training.final_model` runs it once per experiment
and keeps the result."""
from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch

from ..losses import per_example_loss
from ..models import input_trimmer, row_groups
from ..progress import progress_bar
from ..settings import ExperimentConfig
from ..tensors import as_inputs, as_targets
from .rows import SUBSET_SEED, VAL_FRACTION, VAL_SEED, VAL_SIZE

__all__ = ["PROCEDURE", "AUGMENT_SEED_OFFSET", "CURVE_POINTS", "procedure", "evaluate",
           "fit_model"]

# Choices not fixed by the paper, per model family. They are part of the record and of the key
# that decides whether a saved model can be reused.
PROCEDURE = {
    # threads: the MLPs train on one intra-op thread whatever the caller's setting. Batches of
    # 128 rows gain nothing from more, the last bits of the result then do not depend on the
    # machine, and on a shared CPU OpenMP spinning slows several threads down
    # (benchmarks/README.md)
    "mlp": dict(momentum=0.0, nesterov=False, schedule="constant", augment=False, threads=1),
    "resnet9": dict(momentum=0.9, nesterov=True, schedule="triangular", warmup_fraction=0.2,
                    augment="random crop (pad 4, black fill = Dataset.extra['pad_value']) + "
                            "horizontal flip, fimoda.data.augment_images"),
    "text": dict(schedule="constant", dropout="encoder default, active in train mode"),
}
AUGMENT_SEED_OFFSET = 1  # augmentation generator seed = cfg.train.seed + this
CURVE_POINTS = 100     # tabular: full-batch train/test loss at most this many epochs (+ the last)


def procedure(cfg: ExperimentConfig) -> dict:
    """Every training choice outside ``cfg`` (recorded, and compared before reuse)."""
    if cfg.model not in PROCEDURE:
        raise ValueError(f"unknown model {cfg.model!r}; choose from {sorted(PROCEDURE)}")
    out = dict(PROCEDURE[cfg.model])
    out.update(shuffle="torch.randperm per epoch, torch.Generator(cfg.train.seed)",
               loss="mean per-example loss over the batch", subset_seed=SUBSET_SEED)
    if cfg.train.select_epoch_by_val:
        out.update(val_size=VAL_SIZE, val_fraction=VAL_FRACTION, val_seed=VAL_SEED)
    if cfg.model == "resnet9":
        out["augment_seed"] = f"cfg.train.seed + {AUGMENT_SEED_OFFSET}"
    return out


# ----------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate(model: torch.nn.Module, X, y, task: str, batch_size: Optional[int] = None) -> dict:
    """Mean per-example loss (1/n) sum_i L(z_i; theta) of ``model`` in eval mode, and
    accuracy (classification) or RMSE and R^2 = 1 - SSE / sum (y - mean y)^2 (regression, in the
    units of ``y``). The model's train/eval mode is restored afterwards."""
    p = next(model.parameters())
    X, y = as_inputs(X, p.dtype, p.device), as_targets(y, task, p.dtype, p.device)
    if len(X) != len(y) or len(X) == 0:
        raise ValueError(f"X and y must be non-empty with equal lengths, got {len(X)}, {len(y)}")
    loss_fn = per_example_loss(task)
    bs = len(X) if batch_size is None else int(batch_size)
    trim = input_trimmer(model)
    was_training = model.training
    model.eval()
    try:
        losses, preds = [], []
        for k in range(0, len(X), bs):
            out = model(trim(X[k:k + bs]))
            losses.append(loss_fn(out, y[k:k + bs]))
            preds.append(out.reshape(-1) if task == "regression" else out.argmax(1))
    finally:
        model.train(was_training)
    loss, pred = torch.cat(losses), torch.cat(preds)
    res = {"loss": float(loss.mean()), "n": len(X)}
    if task == "classification":
        res["accuracy"] = float((pred == y).double().mean())
    else:
        sse = float(((pred - y) ** 2).sum())
        sst = float(((y - y.mean()) ** 2).sum())
        res["rmse"] = math.sqrt(sse / len(y))
        res["r2"] = 1.0 - sse / sst if sst > 0 else float("nan")
    return res


# ----------------------------------------------------------------------------- optimisation
def _optimizer(cfg: ExperimentConfig, model, total_steps: int):
    """(optimizer, lr-multiplier function of the step) for the model family."""
    tc, proc = cfg.train, PROCEDURE[cfg.model]
    params = [p for p in model.parameters() if p.requires_grad]
    if tc.optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=tc.lr, momentum=proc.get("momentum", 0.0),
                              nesterov=proc.get("nesterov", False), weight_decay=tc.weight_decay)
    elif tc.optimizer == "adamw":
        opt = torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay)
    else:
        raise ValueError(f"unknown optimizer {tc.optimizer!r} for the final model")
    if proc["schedule"] == "triangular":
        warm = max(1, round(proc["warmup_fraction"] * total_steps))

        def factor(step):
            """Update ``step`` (0-based) uses the triangle through (0, 0), (warm, 1),
            (total, 0) at its midpoint t = step + 1/2: no update has lr 0, none is repeated."""
            t = step + 0.5
            if t < warm:
                return t / warm
            return max(total_steps - t, 0.0) / max(total_steps - warm, 1)
    else:
        def factor(step):
            return 1.0
    return opt, factor


def fit_model(model, cfg: ExperimentConfig, Xtr, ytr, Xte, yte, Xval, yval, progress: bool,
              pad_value=None):
    """The training loop shared by every model family; returns (curves, best_epoch).

    Plain SGD (the MLPs: no momentum, weight decay, clipping or schedule) is applied directly,
    theta <- theta - lr * g, which is what ``torch.optim.SGD`` computes but without its per-step
    overhead (benchmarks/README.md). Nothing is read back to the host inside an epoch.
    """
    tc, proc = cfg.train, PROCEDURE[cfg.model]
    loss_fn = per_example_loss(cfg.task)
    n, bs = len(Xtr), tc.batch_size
    n_batches = math.ceil(n / bs)
    params = [p for p in model.parameters() if p.requires_grad]
    trim = input_trimmer(model)
    plain_sgd = (tc.optimizer == "sgd" and proc.get("momentum", 0.0) == 0.0
                 and tc.weight_decay == 0.0 and tc.grad_clip is None
                 and proc["schedule"] == "constant")
    opt, factor = (None, None) if plain_sgd else _optimizer(cfg, model, tc.epochs * n_batches)
    base_lrs = None if plain_sgd else [g["lr"] for g in opt.param_groups]
    order_gen = torch.Generator().manual_seed(tc.seed)
    augment = None
    if proc.get("augment"):
        from ..data import augment_images
        aug_gen = torch.Generator().manual_seed(tc.seed + AUGMENT_SEED_OFFSET)
        fill = 0.0 if pad_value is None else np.asarray(pad_value, dtype=np.float64)
        augment = lambda x: augment_images(x, aug_gen, padding=4, fill=fill)  # noqa: E731
    tabular = cfg.model == "mlp"
    select = tc.select_epoch_by_val and Xval is not None and len(Xval) > 0
    # Full-batch losses (tabular) at up to CURVE_POINTS evenly spaced epochs and the last.
    every = math.ceil(tc.epochs / CURVE_POINTS)
    eval_epochs = [e for e in range(1, tc.epochs + 1) if e % every == 0 or e == tc.epochs]
    minibatch = torch.zeros(tc.epochs, dtype=torch.float64)
    full_train, full_test, val_acc = [], [], []
    best = (-1.0, -1, None)  # (val accuracy, epoch, state)
    step = 0
    bar = progress_bar(range(tc.epochs), desc=f"train {cfg.dataset}", unit="epoch",
                       disable=not progress)
    for epoch in bar:
        model.train()
        perm = torch.randperm(n, generator=order_gen).to(Xtr.device)
        running = torch.zeros((), dtype=torch.float64, device=Xtr.device)
        inner = range(n_batches)
        if not tabular and progress:
            inner = progress_bar(inner, desc=f"epoch {epoch + 1}", leave=False)
        for b in inner:
            idx = perm[b * bs:(b + 1) * bs]
            xb, yb = Xtr[idx], ytr[idx]
            if augment is not None:
                xb = augment(xb)
            groups = row_groups(model, xb, len(xb))
            if len(groups) == 1:
                loss = loss_fn(model(trim(xb)), yb).mean()
            else:   # padded text: the batch mean summed over groups of similar length
                loss = sum(loss_fn(model(trim(xb[g])), yb[g]).sum() for g in groups) / len(xb)
            if plain_sgd:
                grads = torch.autograd.grad(loss, params)
                with torch.no_grad():
                    for p, g in zip(params, grads):
                        p.sub_(g, alpha=tc.lr)
            else:
                for g, lr in zip(opt.param_groups, base_lrs):
                    g["lr"] = lr * factor(step)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if tc.grad_clip is not None:
                    torch.nn.utils.clip_grad_norm_(params, tc.grad_clip)
                opt.step()
            running.add_(loss.detach().double(), alpha=len(idx))
            step += 1
        minibatch[epoch] = (running / n).cpu()
        last = float(minibatch[epoch])
        if not math.isfinite(last):
            raise FloatingPointError(f"training diverged: the mean minibatch loss of epoch "
                                     f"{epoch + 1} is {last} (lr {tc.lr})")
        post = {"loss": f"{last:.4g}"}
        if tabular and epoch + 1 in eval_epochs:  # an MLP has no train/eval-mode layers
            with torch.no_grad():
                full_train.append(float(loss_fn(model(Xtr), ytr).mean()))
                full_test.append(float(loss_fn(model(Xte), yte).mean()))
            post["test"] = f"{full_test[-1]:.4g}"
        if select:
            acc = evaluate(model, Xval, yval, cfg.task, batch_size=bs)["accuracy"]
            val_acc.append(acc)
            if acc > best[0]:
                best = (acc, epoch, {k: v.detach().clone() for k, v in model.state_dict().items()})
            post["val_acc"] = f"{acc:.4f}"
        if progress:
            bar.set_postfix(post)
    best_epoch = tc.epochs - 1
    if select:
        best_epoch = best[1]
        model.load_state_dict(best[2])
    model.eval()
    curves = {"epoch": list(range(1, tc.epochs + 1)), "minibatch_loss": minibatch.tolist()}
    if tabular:
        curves.update(eval_epoch=eval_epochs, train_loss=full_train, test_loss=full_test)
    if select:
        curves["val_accuracy"] = val_acc
    return curves, best_epoch
