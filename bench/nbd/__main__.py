"""``python -m bench.nbd`` from the repository root."""

import sys

from .harness import main

sys.exit(main(prog="python -m bench.nbd"))
