"""The quality study on a real decoder: at equal bits per parameter, is lqplan's planned mix as good as uniform
QLoRA, LoftQ and QA-LoRA on SmolLM2-135M or Gemma 3 270M, before and after the same causal-LM fine-tuning?
planner/study/quality_decoder.py says what it measures and how; this is its command line.

    python bench/quality_decoder.py --out reports/quality-decoder --device cuda --seeds 3 --parallel 4   # the study
    python bench/quality_decoder.py --device cuda --seeds 1 --key-seeds 3 --parallel 10   # in one device session
    python bench/quality_decoder.py --tiny --out /tmp/quality-decoder --device cpu                       # smoke run
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from planner.study.quality_decoder import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
