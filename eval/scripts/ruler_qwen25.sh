#!/usr/bin/env bash
# RULER (offline NIAH family + variable tracking), Qwen2.5-7B-Instruct, 4k-64k, 50% sparsity.
# Qwen2.5-7B-Instruct is trained to 32k; 64k needs YaRN: ROPE_YARN=1 writes a config override.
#   NGPU=8 eval/scripts/ruler_qwen25.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
MODEL=${MODEL:-Qwen/Qwen2.5-7B-Instruct}
METHODS=${METHODS:-dense,ba_att:0.5,block_sparse:0.5,sparsed:0.5}
LENGTHS=${LENGTHS:-4096,8192,16384,32768,65536}
OUT=${OUT:-runs/ruler_qwen25_7b}
eval/scripts/run_sharded.sh ruler --model "$MODEL" --lengths "$LENGTHS" --num-samples "${NUM_SAMPLES:-25}" \
  --methods "$METHODS" --dtype bf16 --attn-implementation sdpa --batch-size "${BATCH_SIZE:-1}" \
  --out "$OUT" ${LIMIT:+--limit "$LIMIT"} "$@"
