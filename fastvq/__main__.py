import sys

from fastvq.cli import main

sys.exit(main())
