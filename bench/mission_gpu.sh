#!/usr/bin/env bash
# Issue 19's must-show on one GPU: the mission command end to end on the 13B-shaped model (profile of the default
# 48-point grid, the exact solver's proof, the reports), then bench/bench_loftq.py against PEFT in the same run.
#   bash bench/mission_gpu.sh OUT [TOKENIZER_DIR]
# Writes OUT/commands.txt, one log per step (also appended to OUT/all.log), the plan and its reports, loftq.json.
set -uo pipefail
OUT=${1:?usage: mission_gpu.sh OUT [TOKENIZER_DIR]}; TOK=${2:-}
M=${MODEL:-/var/tmp/llama13b}; W=${WORK:-/var/tmp/lq}; PY=${PYTHON:-python3}
mkdir -p "$OUT" "$W"
source "$(dirname "$0")/gpu_steps.sh"  # run, lq
[ -f "$M/config.json" ] || run write $PY bench/write_shaped_model.py --shape llama2-13b --out "$M" ${TOK:+--tokenizer "$TOK"}
# The mission command as a user types it (default grid, default cache and output folders), in a fresh folder so
# nothing is cached: the wall time is the whole command.
rm -rf "$W/mission" && mkdir -p "$W/mission"
run mission bash -c "cd '$W/mission' && PYTHONPATH='$PYTHONPATH' $PY -m planner plan --budget 2.75bits --model '$M'"
mkdir -p "$OUT/mission-out" && cp -r "$W/mission/lqplan-out/." "$OUT/mission-out/" 2>/dev/null
run loftq $PY bench/bench_loftq.py --out "$OUT/loftq.json"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1
