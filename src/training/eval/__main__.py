"""`python -m training.eval`: the evaluation suite's command line (training.eval.cli)."""

import sys

from .cli import main

sys.exit(main())
