"""Run an lqplan command on a GPU that looks smaller than it is: torch.cuda.set_per_process_memory_fraction caps
this process's allocations at --gib GiB (a 24 GB or 8 GB card on an H200), then the command runs as `lqplan` would.

    python bench/emulate_gpu.py --gib 24 -- train --plan P --batch-size 8 --max-len 1024 --gradient-checkpointing
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from planner.cli import main  # noqa: E402

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gib", type=float, required=True, help="the emulated card's memory in GiB")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- then the lqplan arguments")
    args = p.parse_args()
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, args.gib * 2**30 / total), 0)
    print(f"emulating a {args.gib:g} GiB card on a {total / 2**30:.1f} GiB {torch.cuda.get_device_name(0)}",
          file=sys.stderr)
    sys.exit(main([a for a in args.command if a != "--"]))
