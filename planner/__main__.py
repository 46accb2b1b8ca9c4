"""`python -m planner ...` (and `torchrun -m planner ...`): the lqplan command line."""

import sys

from .cli import main

sys.exit(main())
