"""`python -m lmforge ...` (also what `torchrun -m lmforge` runs)."""

import sys

from lmforge.cli import main

sys.exit(main())
