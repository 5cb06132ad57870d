"""The paper layer: the paper's experiment, built on fimoda's core.

Profiles and the paper's settings (``config``), the notebooks' steps (``experiment``), notebook
07's studies (``beyond``), figures, summary and reports, the pipeline that runs the notebooks and
the ``fimoda`` command. The core (``fimoda`` outside this package) imports nothing from here
(``tests/test_layers.py``).
"""
