#!/usr/bin/env bash
# Video fidelity of Wan2.1-T2V-1.3B (480p, 81 frames, 50 steps): each method vs dense, same prompt and seed.
#   NGPU=8 eval/scripts/fidelity_wan21.sh     (MODEL=Wan-AI/Wan2.1-T2V-14B-Diffusers for the large one)
set -euo pipefail
cd "$(dirname "$0")/../.."
MODEL=${MODEL:-Wan-AI/Wan2.1-T2V-1.3B-Diffusers}
METHODS=${METHODS:-dense,ba_att:0.5,block_sparse:0.5,sparsed:0.5}
OUT=${OUT:-runs/fidelity_wan21_1.3b}
eval/scripts/run_sharded.sh video-fidelity --model "$MODEL" --prompts eval/prompts/video_prompts.txt \
  --methods "$METHODS" --num-frames 81 --height 480 --width 832 --steps 50 --guidance-scale 5.0 --seed 0 \
  --dtype bf16 --out "$OUT" ${LIMIT:+--limit "$LIMIT"} "$@"
