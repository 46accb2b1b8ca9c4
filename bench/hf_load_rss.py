"""Host memory of loading a planned model, from process start: transformers' from_pretrained with LqplanConfig (the
HF route) or lqplan's own streaming builder (planner.train.build.build_student, what `lqplan train` runs). One route
per process; prints one JSON line with the max RSS (resource.getrusage, from process start) and the seconds.

    python bench/hf_load_rss.py --model M --route hf --plan P [--device cpu] [--init qlora]
    python bench/hf_load_rss.py --model M --route lqplan --plan P
    python bench/hf_load_rss.py --model M --make-plan P     # a uniform NF2/NF3/NF4 b64 plan, no profiling
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def make_plan(folder: str, out: str) -> None:
    """A plan that cycles NF2 / NF3 / NF4 (block 64, rank 16) over the model's matrices: enough to exercise every
    loader path without profiling the model first."""
    from transformers import AutoConfig

    from planner.profile.grid import GridPoint
    from planner.train.apply import explicit_plan
    from planner.train.build import skeleton
    from quant import QuantConfig

    model = skeleton(AutoConfig.from_pretrained(folder), True)
    points = [GridPoint(QuantConfig(bits=b, blocksize=64), 16) for b in (2, 3, 4)]
    explicit_plan(model, lambda i, name, shape: points[i % 3], model_path=folder, iters=0).save(out)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--plan")
    p.add_argument("--route", choices=("hf", "lqplan"))
    p.add_argument("--device", default="cpu")
    p.add_argument("--init", default="qlora", choices=("qlora", "loftq"))
    p.add_argument("--make-plan", default=None, help="write a uniform plan for --model here and exit")
    args = p.parse_args(argv)
    if args.make_plan:
        make_plan(args.model, args.make_plan)
        return {}
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from planner.hf import LqplanConfig
    from planner.model.resolve import resolve_model
    from planner.plan.document import Plan
    from planner.train.apply import LayerRecipe
    from planner.train.build import build_student

    plan = Plan.load(args.plan)
    dev = torch.device(args.device)
    t = time.perf_counter()
    if args.route == "hf":
        model = AutoModelForCausalLM.from_pretrained(args.model, quantization_config=LqplanConfig(plan, init=args.init),
                                                     device_map={"": str(dev)}, dtype=torch.bfloat16)
    else:
        source = resolve_model(args.model)
        model = build_student(source, plan, AutoConfig.from_pretrained(args.model), LayerRecipe.of(plan, args.init),
                              causal=True, device=dev, dtype=torch.bfloat16)
    seconds = time.perf_counter() - t
    result = {"route": args.route, "model": args.model, "device": str(dev), "init": args.init,
              "seconds": round(seconds, 1), "max_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
              "params": sum(p.numel() for p in model.parameters())}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
