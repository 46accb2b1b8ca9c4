"""Is the planner's error the right proxy? Predicted total error against KL measured with `lqplan evaluate --plan`,
per objective, on one real decoder on the CPU (planner.study.proxy).

    OMP_NUM_THREADS=1 python bench/proxy_study.py --model smollm2-135m --work .lqplan-proxy/smollm2 \
        --out reports/quality-decoder/proxy
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from planner.errors import UserError  # noqa: E402
from planner.study.proxy import main  # noqa: E402

if __name__ == "__main__":
    try:
        sys.exit(main())
    except UserError as e:
        print(f"proxy_study: error: {e}", file=sys.stderr)
        sys.exit(2)
