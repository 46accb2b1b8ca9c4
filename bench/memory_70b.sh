#!/usr/bin/env bash
# The 70B extrapolation on one GPU (figures and commands: reports/memory.md): a Llama-2-70B-shaped model
# (8192/28672, 64 heads, 8 KV heads) written with 20 of its 80 layers, a 10-layer view of the same shards, the
# 2.75-bit fine-tune at batch 1 x 2048 with checkpointing measured on both; per-layer figures come from the
# difference and are extrapolated to 80 layers in reports/memory.md.
#   bash bench/memory_70b.sh OUT [TOKENIZER_DIR]
set -uo pipefail
OUT=${1:?usage: memory_70b.sh OUT [TOKENIZER_DIR]}; TOK=${2:-}
M=${MODEL:-/var/tmp/llama70b-20}; V=/var/tmp/llama70b-10; W=${WORK:-/var/tmp/lq70}; PY=${PYTHON:-python3}
mkdir -p "$OUT" "$W"
source "$(dirname "$0")/gpu_steps.sh"  # run, lq, GRID
TRAIN=(--steps 6 --batch-size 1 --max-len 2048 --gradient-checkpointing --eval-texts 1 --no-reference --no-save --quiet)
[ -f "$M/config.json" ] || run write $PY bench/write_shaped_model.py --shape llama2-70b --layers 20 --out "$M" ${TOK:+--tokenizer "$TOK"}
run view $PY - "$M" "$V" 10 <<'PY'
import json, os, sys
src, dst, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
os.makedirs(dst, exist_ok=True)
cfg = json.load(open(f"{src}/config.json")); cfg["num_hidden_layers"] = n
json.dump(cfg, open(f"{dst}/config.json", "w"), indent=1)
index = json.load(open(f"{src}/model.safetensors.index.json"))
keep = {k: f for k, f in index["weight_map"].items() if ".layers." not in k or int(k.split(".layers.")[1].split(".")[0]) < n}
for f in set(keep.values()) | {x for x in os.listdir(src) if not x.endswith((".safetensors", ".json"))} | {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"}:
    if os.path.exists(f"{src}/{f}") and not os.path.exists(f"{dst}/{f}"):
        os.symlink(f"{src}/{f}", f"{dst}/{f}")
json.dump({"metadata": {}, "weight_map": keep}, open(f"{dst}/model.safetensors.index.json", "w"))
print(f"{dst}: {n} layers, {len(set(keep.values()))} shards")
PY
run plan20 lq plan --budget 2.75bits --model "$M" "${GRID[@]}" --out "$W/p20"
run plan10 lq plan --budget 2.75bits --model "$V" "${GRID[@]}" --out "$W/p10"
run train20 lq train --plan "$W/p20/plan.json" "${TRAIN[@]}" --out "$W/t20"
run train10 lq train --plan "$W/p10/plan.json" "${TRAIN[@]}" --out "$W/t10"
run train20-8bit lq train --plan "$W/p20/plan.json" "${TRAIN[@]}" --optimizer paged_adamw8bit --adapter-dtype bf16 \
  --out "$W/t20-8bit"
for r in t20 t10 t20-8bit; do cp "$W/$r/train_report.json" "$OUT/train-$r.json" 2>/dev/null; done
for p in p20 p10; do cp "$W/$p/plan.json" "$OUT/plan-$p.json" 2>/dev/null; done
