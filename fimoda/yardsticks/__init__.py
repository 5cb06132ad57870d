"""The field's yardsticks beside the paper's cosine to the further-training gold standard:
``noise_ceiling`` (the cosine the exact answer would reach against a K-seed gold: what any
method's cosine is capped by), ``lds_runs`` (the models of the linear datamodeling score:
group further training from theta^f over subsets of the left-out set, or classic re-training
over subsets of the training set; the score itself is :func:`fimoda.metrics.lds`) and
``additivity`` (group leave-out against the sum of single leave-outs, and a method's summed score
over a group)."""
from .additivity import (additive_estimate, additivity_error, group_score, membership,
                         paired_cosine)
from .lds_runs import LDSRuns, draw_subsets, further_training_lds, retraining_lds
from .noise_ceiling import NoiseCeiling, gold_noise_ceiling, noise_ceiling, seeds_needed

__all__ = ["NoiseCeiling", "noise_ceiling", "gold_noise_ceiling", "seeds_needed", "LDSRuns",
           "draw_subsets", "further_training_lds", "retraining_lds", "membership",
           "additive_estimate", "additivity_error", "group_score", "paired_cosine"]
