"""The table of the CPU jobs of claim (b): python reports/quality-decoder/cpu-b/make_table.py reports/quality-decoder/cpu-b"""

import json
import statistics
import sys
from pathlib import Path

folder = Path(sys.argv[1])
names = {"qlora": "QLoRA (NF4+dq b64 r16, zero-init)", "ilp": "lqplan (data-free)", "ilp_fisher": "lqplan (Fisher)"}
lines = ["| arm | bits/param | bytes held | error | Fisher error | ppl before | ppl after | seeds | loss first -> last |",
         "|---|---|---|---|---|---|---|---|---|"]
for arm, label in names.items():
    runs = sorted(folder.glob(f"runs/4.7329-{arm}-s*/result.json"))
    if not runs:
        continue
    rs = [json.loads(p.read_text()) for p in runs]
    # the device's plan (the CPU jobs ran it re-addressed to this machine's folder: setup_jobs.py)
    plan = json.loads((folder.parent / f"runs/4.7329-{arm}/plan.json").read_text())
    after = [r["result"]["ppl_after"] for r in rs]
    first = rs[0]["result"]
    spread = f" ± {statistics.stdev(after):.3f}" if len(after) > 1 else ""
    lines.append(f"| {label} | {plan['totals']['bits_per_param']:.4f} | {first['bytes_held']:,} | "
                 f"{first['total_error']:.4g} | {first['fisher_error']:.4g} | "
                 f"{statistics.mean(r['result']['ppl_before'] for r in rs):.3f} | {statistics.mean(after):.3f}{spread} | "
                 f"{', '.join(f'{a:.3f}' for a in after)} | {first['loss_first']:.3f} -> {first['loss_last']:.3f} |")
print("\n".join(lines))
