"""Assumption 1 of the paper for the methods that solve with the damped TRUE Hessian (Prop. 1,
eq. 16): lambda > -lambda_min(H/n). lambda_min comes from Lanczos at theta^f, once per model, kept
on disk under a fingerprint of the training rows, labels and theta^f."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from ... import store
from ...settings import ExperimentConfig
from ...influence.specs import assumption1_methods
from ...io import load_json, save_json


# Methods whose damped TRUE Hessian must be positive definite for their linear solve (their
# specs' ``assumption1``): their damping is raised where needed to satisfy Assumption 1 of the
# paper, lambda > -lambda_min(H).
ASSUMPTION1_METHODS = assumption1_methods()


def smallest_hessian_eigenvalue(att, n_iter: int = 60, seed: int = 0, path=None,
                                key: Optional[dict] = None) -> float:
    """lambda_min of the mean-loss Hessian H/n at theta^f, by Lanczos (the smallest Ritz value:
    an upper bound that is tight for the extreme eigenvalues after a few dozen steps). Computed
    once per model (Prop. 1 and eq. 16 share it); with ``path`` it is also kept on disk under
    ``key`` (what it depends on) in the result store, so a rerun whose scores are cached does not
    recompute it."""
    from ...influence.arnoldi import arnoldi_eig
    from ...influence.operators import block_products
    mem = ("lambda_min(H/n)", n_iter, seed)
    if mem not in att.shared:
        p = att.problem

        def compute():
            mv = lambda v: block_products(p, p.X, p.Y, v[:, None], "true")[:, 0] / att.n_train
            mu, _ = arnoldi_eig(mv, p.n_params, n_iter, seed, p.dtype, p.device, progress=False)
            att.shared[mem] = float(mu.min())
            if path is not None:
                save_json(path, {"lambda_min": att.shared[mem]})

        if path is None:
            compute()
        else:
            inputs = {"n_iter": n_iter, "seed": seed, "n_train": att.n_train, **(key or {})}
            att.shared[mem] = store.cached(path, inputs, compute,
                                           lambda q: float(load_json(q)["lambda_min"]),
                                           what="lambda_min of the Hessian", device=p.device)
    return att.shared[mem]


def assumption1_damping(att, cfg: ExperimentConfig, margin: float = 1.2, directory=None) -> float:
    """max(lambda_G x grid[index], margin x (-lambda_min(H/n))): the configured damping, raised
    just enough for H/n + lambda I to be positive definite (Assumption 1). With ``directory``,
    lambda_min is kept there (``hessian_lambda_min.json``)."""
    from ...influence import damping_value
    m = cfg.methods
    lam = damping_value(att, m.damping_grid, m.damping_index)
    path = None if directory is None else Path(directory) / "hessian_lambda_min.json"
    key = None if path is None else {"problem": _fingerprint(att.problem)}
    return max(lam, margin * max(0.0, -smallest_hessian_eigenvalue(att, path=path, key=key)))


def _fingerprint(problem) -> str:
    """sha256 of what a training-set operator depends on: the rows, the labels and theta^f."""
    import hashlib
    h = hashlib.sha256()
    for t in [problem.X, problem.Y] + [problem.params[n] for n in problem.names]:
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()
