#!/usr/bin/env bash
# All GPU benchmarks in one go (~6-8 min on one H100): the GPU tests of the engine and the dequant kernels,
# LoftQ per matrix vs PEFT, the whole grid on a 13B-shaped model (GRID_LAYERS, default 2, extrapolated to 40), the
# training step (Triton / torch.compile dequant) vs bitsandbytes NF4 + LoRA.
# Outputs (JSON + logs) go to $OUT, else reports/bench-raw/. bitsandbytes must be importable for the PEFT/bnb columns.
#   bash bench/run_gpu_benches.sh            # TINY=1 bash bench/run_gpu_benches.sh for a CPU smoke run
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-reports/bench-raw}"
mkdir -p "$OUT"
TINY_FLAG=""
[ "${TINY:-0}" = "1" ] && TINY_FLAG="--tiny"
export PYTHONUNBUFFERED=1
run() {  # name, time limit (s), command...
    local name=$1 limit=$2; shift 2
    echo "=== $name ($*)"
    local t0=$SECONDS
    timeout "$limit" "$@" > >(tee "$OUT/$name.log") 2>&1
    local rc=$?
    echo "=== $name: exit $rc after $((SECONDS - t0)) s"
}
{
    python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU')"
    python -c "import bitsandbytes, peft; print('bitsandbytes', bitsandbytes.__version__, 'peft', peft.__version__)" || echo "bitsandbytes/peft not importable"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
} > >(tee "$OUT/env.txt") 2>&1
run test_fastgrid 120 python -m pytest -q -x tests/test_fastgrid.py -k "cuda or subset or full_width"
run test_kernels 180 python -m pytest -q tests/test_triton_dequant.py tests/test_apply.py -k "triton or kernel or compiled or cuda or gpu"
run loftq 200 python bench/bench_loftq.py $TINY_FLAG --out "$OUT/loftq.json"
[ -z "$TINY_FLAG" ] && run dequant 120 python bench/bench_dequant.py --out "$OUT/dequant.json"
run step 240 python bench/bench_step.py $TINY_FLAG --out "$OUT/step.json"
run grid "${GRID_LIMIT:-240}" python bench/bench_grid.py $TINY_FLAG --layers "${GRID_LAYERS:-2}" --out "$OUT/grid.json"
echo
echo "===== summary ====="
grep -hE "speed-up|err ours|ratio |whole grid|EXTRAPOLATED|breakdown|skipped|passed|failed|error" \
    "$OUT"/test_fastgrid.log "$OUT"/test_kernels.log "$OUT"/loftq.log "$OUT"/dequant.log "$OUT"/step.log "$OUT"/grid.log 2>/dev/null | tee "$OUT/summary.txt"
