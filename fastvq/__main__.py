"""``python -m fastvq``: the same as the `fastvq` command."""

import sys

from fastvq.cli import main

if __name__ == "__main__":
    sys.exit(main())
