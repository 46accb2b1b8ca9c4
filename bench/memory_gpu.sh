#!/usr/bin/env bash
# The issue-17 memory runs on one GPU, 13B-shaped model (figures and commands: reports/memory.md).
#   bash bench/memory_gpu.sh OUT [TOKENIZER_DIR]
# Writes OUT/commands.txt, one log per step (all of them also appended to OUT/all.log as they finish), the train
# reports, the plans and the QLoRA anchor's JSON.
set -uo pipefail
OUT=${1:?usage: memory_gpu.sh OUT [TOKENIZER_DIR]}; TOK=${2:-}
M=${MODEL:-/var/tmp/llama13b}; W=${WORK:-/var/tmp/lq}; PY=${PYTHON:-python3}
mkdir -p "$OUT" "$W"
source "$(dirname "$0")/gpu_steps.sh"  # run, lq, GRID
[ -f "$M/config.json" ] || run write $PY bench/write_shaped_model.py --shape llama2-13b --out "$M" ${TOK:+--tokenizer "$TOK"}
run plan275 lq plan --budget 2.75bits --model "$M" "${GRID[@]}" --out "$W/p275"
run plan4 lq plan --budget 4.127bits --model "$M" "${GRID[@]}" --bits 2,3,4,8 --out "$W/p4"
run train275 lq train --plan "$W/p275/plan.json" --steps 20 --batch-size 4 --max-len 512 --gradient-checkpointing \
  --eval-texts 8 --no-save --out "$W/t275" --cache "$W/cache" --quiet
run qlora $PY bench/qlora_anchor.py --model "$M" --batch-size 4 --max-len 512 --steps 20 --gradient-checkpointing \
  --out "$OUT/qlora-b4-ckpt.json"
run train275-8gib $PY bench/emulate_gpu.py --gib 8 -- train --plan "$W/p275/plan.json" --steps 10 --batch-size 1 \
  --max-len 512 --gradient-checkpointing --eval-texts 2 --no-reference --no-save --out "$W/t275-8g" --quiet
run plan24gb lq plan --budget 24GB --train-batch 8 --seq-len 1024 --gradient-checkpointing --model "$M" \
  "${GRID[@]}" --bits 2,3,4,8 --ranks 16,64 --out "$W/p24"
run train24gb $PY bench/emulate_gpu.py --gib 22.352 -- train --plan "$W/p24/plan.json" --steps 10 --batch-size 8 \
  --max-len 1024 --gradient-checkpointing --eval-texts 2 --no-reference --no-save --out "$W/t24" --quiet
run check $PY bench/memory_model_check.py --model "$M" --plans "$W/p275/plan.json" "$W/p4/plan.json" --batches 1,4 \
  --seq-len 512 --out "$OUT/model_check.json"
for r in t275 t275-8g t24; do cp "$W/$r/train_report.json" "$OUT/train-$r.json" 2>/dev/null; done
for p in p275 p4 p24; do cp "$W/$p/plan.json" "$OUT/plan-$p.json" 2>/dev/null; done
