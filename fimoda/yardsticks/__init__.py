"""The field's yardsticks beside the paper's cosine to the further-training gold standard:
``noise_ceiling`` (the cosine the exact answer would reach against a K-seed gold: what any
method's cosine is capped by) and ``lds_runs`` (the models of the linear datamodeling score:
group further training from theta^f over subsets of the left-out set, or classic re-training
over subsets of the training set; the score itself is :func:`fimoda.metrics.lds`)."""
from .lds_runs import LDSRuns, draw_subsets, further_training_lds, retraining_lds
from .noise_ceiling import NoiseCeiling, gold_noise_ceiling, noise_ceiling, seeds_needed

__all__ = ["NoiseCeiling", "noise_ceiling", "gold_noise_ceiling", "seeds_needed", "LDSRuns",
           "draw_subsets", "further_training_lds", "retraining_lds"]
