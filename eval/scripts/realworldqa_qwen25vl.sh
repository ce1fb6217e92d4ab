#!/usr/bin/env bash
# RealWorldQA, Qwen2.5-VL-7B-Instruct, 50% sparsity with each method vs dense.
#   NGPU=8 eval/scripts/realworldqa_qwen25vl.sh          (DATA: xai-org/RealworldQA or a local copy)
set -euo pipefail
cd "$(dirname "$0")/../.."
MODEL=${MODEL:-Qwen/Qwen2.5-VL-7B-Instruct}
DATA=${DATA:-xai-org/RealworldQA}
METHODS=${METHODS:-dense,ba_att:0.5,block_sparse:0.5,sparsed:0.5}
OUT=${OUT:-runs/realworldqa_qwen25vl_7b}
eval/scripts/run_sharded.sh realworldqa --model "$MODEL" --data "$DATA" --methods "$METHODS" \
  --dtype bf16 --attn-implementation sdpa --batch-size "${BATCH_SIZE:-4}" \
  --out "$OUT" ${LIMIT:+--limit "$LIMIT"} "$@"
