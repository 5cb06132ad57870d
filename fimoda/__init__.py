"""fimoda: final-model-only data attribution (Wei et al., NeurIPS 2025).

Modules follow the paper's concepts: ``config`` (datasets, profiles), ``data`` (loaders),
``models``, ``train`` (final models), ``further_training`` (the gold standard),
``gradients`` (the shared base of every approximation), ``influence`` (the methods),
``metrics``, ``plots``.
"""
__version__ = "0.1.0"
