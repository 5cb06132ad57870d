"""fimoda: final-model-only data attribution (Wei et al., NeurIPS 2025).

The front door (:mod:`fimoda.api`): :func:`attribute` a trained model's test losses to its
training instances with any of the paper's gradient-based methods, and compute the
further-training :func:`gold_standard` they approximate, both as ``scores[test, left_out]``;
:func:`cosine_to_gold` compares them as the paper does.

Two layers (``tests/test_layers.py`` keeps the direction). The core, which knows nothing of the
paper's experiment: ``settings`` (the config classes), ``data`` (loaders and dataset specs),
``models``, ``losses`` (the per-example loss, also in Gauss-Newton form), ``tensors`` (input
conversion), ``training`` (final models), ``gold`` (the gold standard), ``gradients`` (the shared
base of every approximation), ``influence`` (the methods), ``metrics``, ``yardsticks``. The paper
layer (``fimoda.paper``), built on it: ``config`` (profiles), ``experiment`` and ``pipeline`` (the
notebooks' runs), ``beyond`` (notebook 07), ``plots``, ``figures`` (every figure file's kind and
name), ``report`` (figure index and summary), ``reproduction``, ``render`` (the executed notebooks
as HTML pages and their index) and ``cli``.
"""
from .api import TASKS, attribute, attributor, cosine_to_gold, estimate_cost, gold_standard
from .gradients import CustomLossError
from .influence import METHODS
from .parameters import select_parameters

__version__ = "0.1.0"
__all__ = ["attribute", "attributor", "estimate_cost", "gold_standard", "cosine_to_gold",
           "select_parameters",
           "METHODS", "TASKS", "CustomLossError", "__version__"]
