# Sourced by the GPU run scripts (memory_gpu.sh, memory_70b.sh): `run NAME CMD...` runs one step, logs it to
# $OUT/NAME.log, appends the command to $OUT/commands.txt and a summary to ${ALL_LOG:-$OUT/all.log};
# ONLY="name name ..." runs just those steps. `lq` is the lqplan CLI; GRID the quick plain-quantization grid.
run() { local name=$1; shift; [ -z "${ONLY:-}" ] || [[ " $ONLY " == *" $name "* ]] || return 0
  echo "\$ $*" >> "$OUT/commands.txt"; local t0=$SECONDS
  "$@" > "$OUT/$name.log" 2>&1; local rc=$?; echo "[$name] rc=$rc $((SECONDS - t0)) s"; tail -4 "$OUT/$name.log"
  { echo "=== $name rc=$rc $((SECONDS - t0)) s: $*"; grep -v "it/s]" "$OUT/$name.log" | tail -40; } >> "${ALL_LOG:-$OUT/all.log}"; }
lq() { $PY -m planner "$@"; }
GRID=(--bits 2,3,4 --blocks 64 --ranks 16 --iters 0 --cache "$W/cache" --quiet --no-report)
