"""The quality study on the embedded MiniLM: at equal bits per parameter, does lqplan's planned mix beat uniform
QLoRA, uniform LoftQ and QA-LoRA, before and after the same fine-tuning budget? planner/study/quality_encoder.py
says what it measures and how; this is its command line.

    python bench/quality_study.py --out reports/quality --device cuda --seeds 3     # the study (one H100)
    python bench/quality_study.py --out /tmp/quality --device cpu --quick           # CPU smoke run (< 1 min)
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from planner.study.quality_encoder import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
