"""``python -m fimoda``: the command line (:mod:`fimoda.paper.cli`)."""
import sys

from .paper.cli import main

sys.exit(main())
