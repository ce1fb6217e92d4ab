#!/usr/bin/env bash
# Video-MME (frames only, no subtitles), Qwen2.5-VL-7B-Instruct, 50% sparsity with each method vs dense.
#   DATA=/data/Video-MME NGPU=8 eval/scripts/videomme_qwen25vl.sh
# DATA: a local copy of lmms-lab/Video-MME (videomme/*.parquet + videos_chunked_*.zip, unzipped or not)
# or the hub id itself (downloads everything, ~100 GB).
set -euo pipefail
cd "$(dirname "$0")/../.."
MODEL=${MODEL:-Qwen/Qwen2.5-VL-7B-Instruct}
DATA=${DATA:-lmms-lab/Video-MME}
METHODS=${METHODS:-dense,ba_att:0.5,block_sparse:0.5,sparsed:0.5}
OUT=${OUT:-runs/videomme_qwen25vl_7b}
MAX_FRAMES=${MAX_FRAMES:-32}
MAX_PIXELS=${MAX_PIXELS:-200704}  # 448*448 per frame
eval/scripts/run_sharded.sh videomme --model "$MODEL" --data "$DATA" --methods "$METHODS" \
  --max-frames "$MAX_FRAMES" --max-pixels "$MAX_PIXELS" --dtype bf16 --attn-implementation sdpa \
  --out "$OUT" ${LIMIT:+--limit "$LIMIT"} "$@"
