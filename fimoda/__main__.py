"""``python -m fimoda``: the command line (:mod:`fimoda.cli`)."""
import sys

from .cli import main

sys.exit(main())
