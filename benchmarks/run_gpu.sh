#!/usr/bin/env bash
# Run a set of GPU benchmarks in one go, each under its own time limit, logs and JSON to $OUT (or ./out).
#   bash benchmarks/run_gpu.sh kernels ba_att video        # names: kernels ba_att video vlm sparsed blockdiff
#                                                          #        gluon_int8 ncu video8
# diffusers is needed by `video`: if .whl/ holds its wheel it is installed into /tmp/site first.
set -u
cd "$(dirname "$0")/.."
out=${OUT:-out}
mkdir -p "$out"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1 && ! python3 -c "import diffusers" 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
declare -A cmd=(
    [kernels]="benchmarks/bench_kernels.py --skip-sweep --out $out/bench_kernels.json"
    [ba_att]="benchmarks/bench_ba_att.py --out $out/bench_ba_att.json"
    [video]="benchmarks/bench_video.py --warmup 2 --repeat 3 --out $out/bench_video.json"
    [vlm]="benchmarks/bench_vlm.py --out $out/bench_vlm.json"
    [sparsed]="benchmarks/bench_sparsed.py --out $out/bench_sparsed.json"
    [blockdiff]="benchmarks/bench_blockdiff.py --out $out/bench_blockdiff.json"
    [gluon_int8]="benchmarks/bench_gluon.py --precision int8 --sizes 16384,65536 --densities 1.0,0.5 --variants default,tree_reduce --rounds 3 --out $out/bench_gluon_int8.json"
    [ncu]="benchmarks/profile_gluon_ncu.py --out $out/profile_gluon_ncu.json"
    # the Wan step at sparsity 0.5 in 16 and 8 bits, each also with plans kept 5 steps
    [video8]="benchmarks/bench_video.py --warmup 2 --repeat 3 --layout tiled --sparsity 0.5 --precision bf16 int8 int8_fp8 --plan-every 5 --cycles 2 --out $out/bench_video_8bit.json"
)
# kernels: three interleaved rounds per cell (bench_kernels.py --rounds 3)
declare -A limit=([kernels]=480 [ba_att]=130 [video]=200 [vlm]=150 [sparsed]=170 [blockdiff]=170 [gluon_int8]=150 [ncu]=120 [video8]=300)
for name in "$@"; do
    echo "=== $name"
    timeout "${limit[$name]}" python3 ${cmd[$name]} > "$out/$name.log" 2>&1
    echo "exit $? after $SECONDS s"
    tail -n 25 "$out/$name.log"
done
