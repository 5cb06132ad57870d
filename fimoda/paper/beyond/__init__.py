"""Notebook 07, beyond the paper: the two open questions of the paper's §7, answered
with what fimoda already computes.

1. :func:`infinitesimal_study` -- the exact infinitesimal gold standard
   (:mod:`fimoda.gold.infinitesimal`) against the finite ``subtract`` gold standard on identical
   work (same seeds, batch orders, left-out and test instances, evaluation points), in float64 and
   float32, and against notebook 02's gold standard.
2. :func:`trajectory_study` -- the trajectory-matched influence
   (:mod:`fimoda.influence.trajectory`; Gauss-Newton for every model, true Hessian for MLPs;
   images and text by the series' recurrence where needed) and the damping schedule
   lambda(t) = 1/(eta t), scored at every evaluation point of notebook 02's gold standard, beside
   the paper's methods of notebook 03 (Figure-2 style).

Every result is cached next to the dataset's others (``results/<profile>/<dataset>/beyond_*``) and
tabulated for ``results/<profile>/summary.md`` (:func:`fimoda.paper.report.beyond_rows`).
"""
from .common import applies, full_hessian_applies, gold_cosine
from .infinitesimal import (INFINITESIMAL_DATASETS, INFINITESIMAL_WORK, infinitesimal_applies,
                            infinitesimal_figure, infinitesimal_study, infinitesimal_table,
                            rel_error, work_plan)
from .summary import save_summary
from .trajectory import (ADAM_VARIANTS, LABELS, PAPER_SIDE, best_paper_gap,
                         curves_at_points, eval_steps, trajectory_banner, trajectory_config,
                         trajectory_figure, trajectory_gaps, trajectory_study, trajectory_table)

__all__ = ["applies", "full_hessian_applies", "gold_cosine", "INFINITESIMAL_DATASETS", "INFINITESIMAL_WORK",
           "infinitesimal_applies", "infinitesimal_figure", "infinitesimal_study",
           "infinitesimal_table", "rel_error", "work_plan", "save_summary", "ADAM_VARIANTS",
           "LABELS", "PAPER_SIDE", "best_paper_gap", "curves_at_points", "eval_steps",
           "trajectory_banner", "trajectory_config", "trajectory_figure", "trajectory_gaps",
           "trajectory_study", "trajectory_table"]
