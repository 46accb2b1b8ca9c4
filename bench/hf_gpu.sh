#!/usr/bin/env bash
# Issue 20's GPU run on one GPU, 13B-shaped model: the plan through transformers (from_pretrained with
# LqplanConfig, quantized while loading), a short HF Trainer fine-tune of PEFT adapters (examples/finetune_hf.py),
# and `lqplan train` on the same plan, data and batch, peaks from process start side by side.
#   bash bench/hf_gpu.sh OUT [TOKENIZER_DIR]
#   SHAPE=tiny BUDGET=6bits MODEL=/tmp/tiny WORK=/tmp/w bash bench/hf_gpu.sh /tmp/out TOK   # CPU smoke run
# LAYERS=N keeps the first N decoder layers of SHAPE; STEPS, BATCH, MAXLEN set both fine-tunes (default 20, 4, 512).
# Needs `datasets` importable (carry its wheels: pip download --no-deps datasets dill multiprocess xxhash fsspec).
set -uo pipefail
OUT=${1:?usage: hf_gpu.sh OUT [TOKENIZER_DIR]}; TOK=${2:-}
M=${MODEL:-/var/tmp/llama13b}; W=${WORK:-/var/tmp/lq}; PY=${PYTHON:-python3}
mkdir -p "$OUT" "$W"
source "$(dirname "$0")/gpu_steps.sh"  # run, lq, GRID
[ -f "$M/config.json" ] || run write $PY bench/write_shaped_model.py --shape "${SHAPE:-llama2-13b}" ${LAYERS:+--layers "$LAYERS"} --out "$M" ${TOK:+--tokenizer "$TOK"}
[ -f "$W/hf-plan/plan.json" ] || run plan lq plan --budget "${BUDGET:-2.75bits}" --model "$M" "${GRID[@]}" --out "$W/hf-plan"
# Chat records from the built-in pydoc prose (planner.corpus.chat_records: the first sentence asks, the rest answers).
$PY bench/chat_records.py "$W/chat.jsonl"
run hf $PY examples/finetune_hf.py --model "$M" --plan "$W/hf-plan/plan.json" --data "$W/chat.jsonl" \
  --steps "${STEPS:-20}" --batch-size "${BATCH:-4}" --max-len "${MAXLEN:-512}" --gradient-checkpointing --out "$W/hf-out"
run lqtrain lq train --plan "$W/hf-plan/plan.json" --data "$W/chat.jsonl" --steps "${STEPS:-20}" \
  --batch-size "${BATCH:-4}" --max-len "${MAXLEN:-512}" --gradient-checkpointing --eval-texts 2 --no-reference --no-save --out "$W/lq-out" --cache "$W/cache" --quiet
cp "$W/lq-out/train_report.json" "$OUT/lqtrain-report.json" 2>/dev/null
cp "$W/hf-plan/plan.json" "$OUT/plan.json" 2>/dev/null
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1
