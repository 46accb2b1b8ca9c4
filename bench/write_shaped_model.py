"""Write a seeded random model with a real LLM's exact architecture (Llama-2-13B or -70B shapes) as a Hugging Face
folder that `lqplan plan` / `lqplan train` and transformers' `from_pretrained` treat as a checkpoint: config.json,
one bf16 safetensors shard per decoder layer plus one for the embeddings / final norm / head, the shard index and
the embedded MiniLM tokenizer files (vocabulary 30,522). Weights: Student-t(5) scaled to std 0.02 (heavy-tailed like
trained weights), generated on the GPU when there is one. Not a released checkpoint: memory and speed figures are
real, quality figures are not.

    python bench/write_shaped_model.py --shape llama2-13b --out /var/tmp/llama13b            # ~26 GB, ~35 s on an H200
    python bench/write_shaped_model.py --shape llama2-70b --layers 20 --out /var/tmp/llama70b-20
    python bench/write_shaped_model.py --shape tiny --out /tmp/tiny                           # CPU smoke test
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from planner.testing.models import SHAPES, write_shaped_model  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="llama2-13b")
    p.add_argument("--layers", type=int, default=None, help="decoder layers (default: the real model's)")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tokenizer", default=None, help="folder with the tokenizer files (default: the embedded MiniLM)")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    cfg, total = write_shaped_model(args.out, args.shape, args.layers, args.seed, args.device, args.tokenizer)
    print(f"wrote {args.out}: {args.shape}, {cfg['num_hidden_layers']} layers, {total / 1e9:.2f} GB in "
          f"{time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
