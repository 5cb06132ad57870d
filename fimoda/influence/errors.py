"""The typed breakdowns of the influence methods' numerics: a method that raises one of these
failed at its settings (its solver diverged or did not converge, its damped matrix is not
positive definite, its work does not fit the memory budget), as opposed to a wrong argument.
``fimoda.paper.experiment.run_method`` reports any :class:`MethodBreakdown` as a failed method."""


class MethodBreakdown(RuntimeError):
    """A method's numerics broke down at these settings (the base of this module's errors)."""


class LissaDivergedError(MethodBreakdown):
    """LiSSA's recurrence v <- b + (I - A/scale) v blew up: scale <= lambda_max(A)/2, or A is not
    positive definite (true Hessian with too little damping)."""


class NotConvergedError(MethodBreakdown):
    """An iterative solver did not reach its tolerance within its iteration budget."""


class NotPositiveDefiniteError(MethodBreakdown, ValueError):
    """The damped matrix is not positive definite (a solver met a direction of non-positive
    curvature: with the true Hessian, too little damping for Assumption 1). Also a ValueError."""


class MemoryBudgetError(MethodBreakdown, ValueError):
    """What a method would hold in memory exceeds its ``memory_gb`` budget. Also a ValueError."""


def finite_trajectory(scores, route: str):
    """``scores`` (numpy or torch) unchanged if finite, else FloatingPointError naming the
    trajectory route: the linearised further training overflowed (it grows along negative
    curvature and along curvature above 2/lr, as further training itself would)."""
    import numpy as np
    import torch
    finite = torch.isfinite(scores).all() if isinstance(scores, torch.Tensor) else \
        np.isfinite(scores).all()
    if not bool(finite):
        raise FloatingPointError(f"trajectory ({route}): non-finite scores (the linearised "
                                 f"further training overflowed along a direction of negative "
                                 f"curvature or of curvature above 2/lr)")
    return scores
