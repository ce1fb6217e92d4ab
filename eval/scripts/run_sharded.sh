#!/usr/bin/env bash
# Run one `sparsediff eval` command as NGPU shards, one process per GPU, then rebuild the summary.
#   NGPU=8 eval/scripts/run_sharded.sh videomme --model ... --out runs/x
# Every shard writes its own <method>.shard-i-of-n.jsonl; re-running resumes each shard.
set -euo pipefail
NGPU=${NGPU:-$(nvidia-smi -L 2>/dev/null | wc -l)}
NGPU=$(( NGPU > 0 ? NGPU : 1 ))
OUT=""
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
  if [[ "${args[$i]}" == "--out" ]]; then OUT="${args[$((i + 1))]}"; fi
done
[[ -n "$OUT" ]] || { echo "run_sharded.sh: pass --out DIR" >&2; exit 2; }
mkdir -p "$OUT"
pids=()
for ((s = 0; s < NGPU; s++)); do
  CUDA_VISIBLE_DEVICES=$s sparsediff eval "$@" --shard "$s/$NGPU" --no-progress > "$OUT/shard-$s.log" 2>&1 &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=1; done
sparsediff eval report --out "$OUT"
if (( status )); then echo "some shards failed: see $OUT/shard-*.log (re-run to resume)" >&2; fi
exit $status
