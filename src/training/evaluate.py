"""The old name of `python -m training.eval` (training.eval.cli), kept so existing commands keep working."""

import sys

from .eval.cli import main

if __name__ == "__main__":
    sys.exit(main())
