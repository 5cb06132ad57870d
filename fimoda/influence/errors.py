"""The typed breakdowns of the influence methods' numerics: a method that raises one of these
failed at its settings (its solver diverged or did not converge, its damped matrix is not
positive definite, its work does not fit the memory budget), as opposed to a wrong argument.
``fimoda.experiment.run_method`` reports any :class:`MethodBreakdown` as a failed method."""


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
