"""`python -m planner ...` (and `torchrun -m planner ...`): the lqplan command line."""

import sys

try:
    from .cli import main
except KeyboardInterrupt:  # Ctrl-C while Python imports the package: one line, as everywhere else
    print("lqplan: interrupted; nothing was written", file=sys.stderr)
    sys.exit(130)

sys.exit(main())
