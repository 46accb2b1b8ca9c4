#!/usr/bin/env bash
# A/B timing of bench/bench_step.py between two checkouts of lqplan: runs it from BASE_DIR and NEW_DIR alternately,
# PAIRS times each (so drift hits both alike), each from its own tree, then prints per variant the ratio NEW/BASE of
# the median step time, the per-pair ratios' median and range, and (on CUDA) the GPU kernel time ratio.
#   bench/ab_step.sh BASE_DIR NEW_DIR OUT_DIR [PAIRS] [bench_step.py options...]
# e.g. on one H100 (estimated 2-3 minutes, dominated by start-up and building): bench/ab_step.sh ../base . /tmp/ab 3 \
#   --backends triton --repeats 5
set -euo pipefail
if [ $# -lt 3 ]; then
  echo "usage: $0 BASE_DIR NEW_DIR OUT_DIR [PAIRS] [bench_step.py options...]" >&2
  exit 2
fi
base=$(cd "$1" && pwd)
new=$(cd "$2" && pwd)
mkdir -p "$3"
out=$(cd "$3" && pwd)
pairs=${4:-3}
shift $(($# < 4 ? $# : 4))
for i in $(seq 1 "$pairs"); do
  for side in base new; do
    dir=$base
    [ "$side" = new ] && dir=$new
    (cd "$dir" && python bench/bench_step.py --out "$out/$side-$i.json" "$@") > "$out/$side-$i.log" 2>&1 \
      || { echo "bench_step failed in $dir: see $out/$side-$i.log" >&2; tail -5 "$out/$side-$i.log" >&2; exit 1; }
    echo "pair $i $side: $(grep -m1 '^lqplan' "$out/$side-$i.log" || true)"
  done
done
python - "$out" "$pairs" <<'PY'
import json
import statistics
import sys
from pathlib import Path

out, pairs = Path(sys.argv[1]), int(sys.argv[2])
runs = {side: [json.loads((out / f"{side}-{i}.json").read_text()) for i in range(1, pairs + 1)]
        for side in ("base", "new")}
print(f"device {runs['new'][0]['device']}, dims {runs['new'][0]['dims']}, tokens {runs['new'][0]['tokens']}, "
      f"rank {runs['new'][0]['rank']}, {pairs} pairs")
for variant in runs["new"][0]["rows"]:
    if not all(variant in r["rows"] for side in runs for r in runs[side]):
        continue
    step = {side: [r["rows"][variant]["step_s"] for r in runs[side]] for side in runs}
    per_pair = [n / b for n, b in zip(step["new"], step["base"])]
    line = (f"{variant:30s} base {statistics.median(step['base']) * 1e3:8.3f} ms  new "
            f"{statistics.median(step['new']) * 1e3:8.3f} ms  new/base {statistics.median(step['new']) / statistics.median(step['base']):.4f}"
            f"  per pair median {statistics.median(per_pair):.4f} [{min(per_pair):.4f}-{max(per_pair):.4f}]")
    if all("kernel_ms" in r["rows"][variant] for side in runs for r in runs[side]):
        k = {side: statistics.median(r["rows"][variant]["kernel_ms"] for r in runs[side]) for side in runs}
        line += f"  GPU kernels new/base {k['new'] / k['base']:.4f}"
    print(line)
PY
