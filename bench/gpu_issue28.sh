#!/usr/bin/env bash
# Issue 28 in one call on one GPU (about 8 minutes on an H100): the Llama-2-13B-shaped model written; the mission
# command (`lqplan plan --budget 2.75bits`, fresh folder and digest memo) timed from process start by phase
# (run.json); `lqplan train` with every default on (the reference pass included, cold cache) and with
# --no-reference, GPU allocated / reserved peaks from process start and host max RSS beside the printed prediction;
# the bitsandbytes QLoRA anchor at the same batch (4 x 512, checkpointing, 20 steps) with 3 profiled steps; the HF
# route (from_pretrained with LqplanConfig, PEFT, HF Trainer); lqplan's step under torch.profiler.
#   bash bench/gpu_issue28.sh OUT TOKENIZER_DIR
#   TINY=1 bash bench/gpu_issue28.sh /tmp/out TOKENIZER_DIR      # smoke run on a CPU: 1-layer tiny model, no bnb
# OUT receives summary.md (the table, targets beside it), summary.json and raw.tgz (every step's log, the train
# reports, the plan, run.json, the anchor's JSON), refreshed after every step, so a run cut short still returns
# what it measured. Steps run in the order below, each under its own time limit; ONLY="name ..." runs some.
set -uo pipefail
FINAL=${1:?usage: gpu_issue28.sh OUT [TOKENIZER_DIR]}; TOK=${2:-}
REPO=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python3}; W=${WORK:-/var/tmp/lq28}; M=${MODEL:-$W/model}
SLOW=1  # multiplies every step's time limit
if [ "${TINY:-0}" = 1 ]; then  # a CPU: a smaller grid for the plan, and time
  SHAPE=${SHAPE:-tiny}; LAYERS=${LAYERS:-1}; STEPS=${STEPS:-4}; BATCH=${BATCH:-2}; MAXLEN=${MAXLEN:-64}
  BUDGET=${BUDGET:-8bits}; MISSION_ARGS=${MISSION_ARGS:---bits 2,4 --blocks 64 --ranks 8 --iters 1}; SLOW=10
fi
SHAPE=${SHAPE:-llama2-13b}; STEPS=${STEPS:-20}; BATCH=${BATCH:-4}; MAXLEN=${MAXLEN:-512}; BUDGET=${BUDGET:-2.75bits}
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
mkdir -p "$FINAL" "$W/logs" "$W/json"
OUT=$W/logs  # gpu_steps.sh's run() writes each step's log here; FINAL gets the table and one archive
cd "$REPO" && source bench/gpu_steps.sh  # run, lq

collect() {
  $PY bench/issue28_table.py "$W" "$FINAL/summary" 2>> "$W/logs/table.err"
  tar czf "$FINAL/raw.tgz" -C "$W" logs json $(cd "$W" && ls -d train-*/train_report.json mission/lqplan-out/*.json \
    mission/lqplan-out/report.md 2>/dev/null) 2>/dev/null
}
step() {  # NAME LIMIT_S CMD...: one timed step (wall seconds in json/NAME.wall), then the table again
  local name=$1 limit=$2; shift 2
  [ -z "${ONLY:-}" ] || [[ " $ONLY " == *" $name "* ]] || return 0
  local t0; t0=$(date +%s.%N)
  run "$name" timeout "$((limit * SLOW))" "$@"
  awk -v a="$(date +%s.%N)" -v b="$t0" "BEGIN { printf \"%.2f\\n\", a - b }" > "$W/json/$name.wall"
  collect
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no GPU"
  $PY -c "import torch, transformers, peft; print('torch', torch.__version__, '| transformers', transformers.__version__, '| peft', peft.__version__)"
  $PY -c "import bitsandbytes; print('bitsandbytes', bitsandbytes.__version__)" 2>/dev/null || echo "bitsandbytes: not importable"
  echo "cpus $(nproc); model $SHAPE ${LAYERS:+($LAYERS layers) }budget $BUDGET; batch $BATCH x $MAXLEN, $STEPS steps"
} > "$W/logs/env.log" 2>&1
cat "$W/logs/env.log"

[ -f "$M/config.json" ] || step write 300 $PY bench/write_shaped_model.py --shape "$SHAPE" ${LAYERS:+--layers "$LAYERS"} \
  --out "$M" ${TOK:+--tokenizer "$TOK"}

# The mission command as a user types it, in a fresh folder (no profile cache) with a fresh digest memo (the
# fingerprint reads every byte): the wall time is the whole command, imports and process exit included.
rm -rf "$W/mission" && mkdir -p "$W/mission"
step mission 300 bash -c "cd '$W/mission' && LQPLAN_DIGEST_MEMO='$W/mission/digests.json' $PY -m planner plan \
  --budget '$BUDGET' --model '$M' ${MISSION_ARGS:-}"
P=$W/mission/lqplan-out/plan.json

# `lqplan train` as users run it (every default on: the reference pass runs, its cache is empty), and without the
# reference pass; --eval-texts 8 keeps the evaluations short (the batch of windows, so the peak, is the same).
TRAIN=(--plan "$P" --batch-size "$BATCH" --max-len "$MAXLEN" --gradient-checkpointing --eval-texts 8 --no-save --quiet)
rm -rf "$W/train-default" "$W/train-noref" "$W/cache-default"
step train-default 240 $PY -m planner train "${TRAIN[@]}" --steps "$STEPS" --out "$W/train-default" \
  --cache "$W/cache-default"
step train-noref 200 $PY -m planner train "${TRAIN[@]}" --steps "$STEPS" --no-reference --out "$W/train-noref" \
  --cache "$W/cache-noref"

if $PY -c "import bitsandbytes" 2>/dev/null; then
  step qlora 240 $PY bench/qlora_anchor.py --model "$M" --batch-size "$BATCH" --max-len "$MAXLEN" --steps "$STEPS" \
    --gradient-checkpointing --profile-steps 3 --out "$W/json/qlora.json"
fi

# The HF route on the same plan, on chat records from the built-in pydoc prose (planner.corpus.chat_records), as
# bench/hf_gpu.sh makes them.
$PY bench/chat_records.py "$W/chat.jsonl"
step hf 240 $PY examples/finetune_hf.py --model "$M" --plan "$P" --data "$W/chat.jsonl" --steps "$STEPS" \
  --batch-size "$BATCH" --max-len "$MAXLEN" --gradient-checkpointing --out "$W/hf-out"

step profile 180 $PY bench/step_profile.py --model "$M" --plan "$P" --batch-size "$BATCH" --max-len "$MAXLEN" \
  --gradient-checkpointing --out "$W/json/step_profile.json"
collect
cat "$FINAL/summary.md"
