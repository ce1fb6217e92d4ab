#!/usr/bin/env bash
# CPU smoke run of every benchmark on stand-in data and tiny random models (a minute or two).
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-runs/smoke}
python -m sparsediff.eval.standins "$OUT/data"
sparsediff eval videomme --model fake --data "$OUT/data/Video-MME" --methods dense,ba_att:0.5 --out "$OUT/videomme"
sparsediff eval realworldqa --model tiny-qwen2-vl --data "$OUT/data/RealworldQA" --methods dense,ba_att:0.5 \
  --dtype fp32 --out "$OUT/realworldqa"
sparsediff eval ruler --model tiny-qwen2 --lengths 1024 --num-samples 1 --tasks niah_single,vt --methods dense,ba_att:0.5 \
  --dtype fp32 --out "$OUT/ruler"
printf 'a red fox running through fresh snow\nwaves breaking on a rocky shore at sunset\n' > "$OUT/prompts.txt"
sparsediff eval video-fidelity --model tiny-wan --prompts "$OUT/prompts.txt" --methods dense,ba_att:0.5 \
  --num-frames 5 --height 32 --width 32 --steps 3 --guidance-scale 1.0 --dtype fp32 --out "$OUT/fidelity"
