"""Write planner.corpus.chat_records() (the pydoc train split as prompt/completion records) as JSONL, the --data
the HF-route benches give examples/finetune_hf.py and `lqplan train`.

    python bench/chat_records.py OUT.jsonl
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from planner.corpus import chat_records  # noqa: E402
from planner.fsio import write_text  # noqa: E402

if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python bench/chat_records.py OUT.jsonl")
    write_text(sys.argv[1], "".join(json.dumps(r) + "\n" for r in chat_records()))
