"""The field's yardsticks beside the paper's cosine to the further-training gold standard:
``noise_ceiling`` (the cosine the exact answer would reach against a K-seed gold: what any
method's cosine is capped by) and ``further_lds`` (the linear datamodeling score with group
further training from theta^f in place of re-training; the score itself is
:func:`fimoda.metrics.lds`)."""
from .noise_ceiling import NoiseCeiling, gold_noise_ceiling, noise_ceiling

__all__ = ["NoiseCeiling", "noise_ceiling", "gold_noise_ceiling"]
