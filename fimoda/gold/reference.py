"""The gold standard the slow, plain way: :func:`reference_further_train`, one model at a time
(``nn.Module`` + ``torch.optim``), which the tests compare the vectorised engines against; and
:func:`retrain_loo`, LOO re-training from scratch with the vectorised engine."""
from __future__ import annotations

import copy
import dataclasses
import time
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn as nn

from ..losses import per_example_loss
from ..models import input_trimmer
from .config import GoldConfig, GoldResult
from .groups import group_list, is_groups
from .optim import torch_optimizer
from .runner import prepare_inputs, checked_test_indices, further_train
from .schedule import AugmentStream, draw_permutation, make_schedule


def reference_further_train(model: nn.Module, task: str, X_train, y_train, X_test, y_test,
                            loo_indices, cfg: GoldConfig,
                            augment: Optional[Callable] = None, test_indices=None) -> GoldResult:
    """The same gold standard as :func:`further_train`, one model at a time: ``nn.Module`` in
    eval mode + ``torch.optim``, each run drawing its own epoch orders from a fresh generator
    seeded with s and cutting the mechanism's order of ``perm``
    (:meth:`~fimoda.gold.mechanisms.Mechanism.order`; ``remove``: ``perm[perm != i]``) into
    batches of B, with the mechanism's loss
    (:meth:`~fimoda.gold.mechanisms.Mechanism.reference_loss`; ``subtract``:
    ``mean(batch losses) - L(z_i) / n``). Groups S (``loo_indices`` as
    :func:`fimoda.gold.groups.as_left_out` takes them): ``perm[~isin(perm, S)]`` and
    ``mean(batch losses) - sum_{i in S} L(z_i) / n``. Slow; for tests."""
    t_start = time.perf_counter()
    model, X, Y, Xt, Yt, loo = prepare_inputs(model, task, X_train, y_train, X_test, y_test,
                                              loo_indices, cfg)
    n, J, B = len(X), len(Xt), cfg.batch_size
    test_idx = checked_test_indices(test_indices, J)
    sched = make_schedule(n, cfg, loo.shape[1] if is_groups(loo) else 1)
    mech = sched.strategy
    loss_fn = per_example_loss(task)
    seeds = cfg.seed_list
    T = len(sched.eval_steps)
    eval_at = {int(s): t for t, s in enumerate(sched.eval_steps)}
    out_loss = np.empty((len(seeds), len(loo) + 1, T, J))
    out_dist = np.empty((len(seeds), len(loo) + 1, T))
    for si, seed in enumerate(seeds):
        for r, i in enumerate([None] + [torch.as_tensor(g) for g in group_list(loo)]):
            m = copy.deepcopy(model).eval()
            trim = input_trimmer(m)
            params = [p for p in m.parameters() if p.requires_grad]
            start = [p.detach().clone() for p in params]
            opt = torch_optimizer(cfg, params)
            g = torch.Generator().manual_seed(int(seed))
            drawn = []
            stream = None if augment is None else AugmentStream(
                augment, X, B, seed, lambda e: drawn[e])

            def record(t):
                with torch.no_grad():
                    out_loss[si, r, t] = loss_fn(m(trim(Xt)), Yt).double().cpu().numpy()
                    out_dist[si, r, t] = float(torch.sqrt(sum(
                        ((p.detach() - p0).double() ** 2).sum() for p, p0 in zip(params, start))))

            record(0)
            step, epoch = 0, 0
            while True:
                perm = draw_permutation(g, n, cfg.shuffle)
                drawn.append(perm)
                order = perm if i is None else mech.order(perm, i)
                for batch in order.split(B):
                    batch = batch.to(X.device)
                    xb = X[batch] if stream is None else stream.get(epoch, batch)
                    loss = loss_fn(m(trim(xb)), Y[batch]).mean()
                    if i is not None:
                        loss = mech.reference_loss(loss, lambda: loss_fn(m(trim(X[i])), Y[i]), n)
                    opt.zero_grad()
                    loss.backward()
                    if cfg.grad_clip is not None:
                        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                    opt.step()
                    step += 1
                    if not sched.by_epoch:
                        if step in eval_at:
                            record(eval_at[step])
                        if step == sched.total:
                            break
                epoch += 1
                if stream is not None:
                    stream.release_before(epoch)
                if sched.by_epoch:
                    record(epoch)
                    if epoch == cfg.epochs:
                        break
                elif step == sched.total:
                    break
    return GoldResult(out_loss[:, 0], out_loss[:, 1:], out_dist[:, 0], out_dist[:, 1:],
                      sched.eval_points, "epoch" if sched.by_epoch else "step",
                      np.asarray(seeds), loo, test_idx,
                      dict(dataclasses.asdict(cfg), engine="reference"),
                      time.perf_counter() - t_start)


def retrain_loo(model_init: nn.Module, cfg, X_train, y_train, X_test, y_test, loo_indices,
                seeds=1, device="cpu", workdir=None, max_runs_per_chunk=None, progress=True,
                callback=None, workdir_mismatch: str = "error", **overrides) -> GoldResult:
    """LOO re-training from scratch (paper Fig. 11): the final model's algorithm (``cfg.train``:
    optimizer, lr, epochs, batch size) from its initialisation theta^0 (``model_init``), on D and
    on every D_{-i} (``remove``), evaluated after every epoch. The same engine as
    :func:`further_train`, started from theta^0 (:meth:`GoldConfig.from_training`). An int
    ``seeds`` S re-trains with seeds ``cfg.train.seed .. + S - 1``; the first full run is then the
    final model's own training. Only the MLP procedure (constant lr, no momentum) is supported.
    ``workdir_mismatch``: as for :func:`further_train`.
    """
    if getattr(cfg, "model", "mlp") != "mlp":
        raise ValueError(f"retrain_loo re-runs the MLP training procedure (plain SGD/AdamW, "
                         f"constant lr); model {cfg.model!r} is trained differently")
    gcfg = GoldConfig.from_training(cfg.train, seeds=seeds, device=device,
                                    max_runs_per_chunk=max_runs_per_chunk, progress=progress,
                                    **overrides)
    return further_train(model_init, cfg.task, X_train, y_train, X_test, y_test, loo_indices,
                         gcfg, workdir=workdir, callback=callback,
                         workdir_mismatch=workdir_mismatch)
