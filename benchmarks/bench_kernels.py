"""Block-sparse attention kernel on a GPU: correctness, tile-config sweep, and the peer comparison.

    python benchmarks/bench_kernels.py --out bench_kernels.json          # everything (H100: ~6 min)
    python benchmarks/bench_kernels.py --skip-grid                        # correctness + sweep only

Peers in the same run: SDPA flash backend, SDPA cuDNN backend, dense SageAttention (when the
``sageattention`` wheel is installed: INT8 Q·Kᵀ, fp16 P·V) and FlexAttention (torch.compile'd) on the same
block mask (all kept blocks marked full, its fastest case). Our kernel runs at every ``--precisions`` entry
(default bf16, int8, int8_fp8) on the same blocks. N in {8k, 16k, 32k, 64k},
B=1, H=16, D=128 (and D=64 at 32k), bf16, random per-head masks at density {1.0, 0.5, 0.2, 0.1}.
TFLOP/s counts 4*N^2*D*H*density. Times are `triton.testing.do_bench` medians on random inputs; at every cell
the dense peers, our kernels and Flex run in turn ``--rounds`` times (default 3) and each keeps its median, so
each ratio is taken under the same GPU state.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sparsediff.commands.args import precisions  # noqa: E402
from sparsediff.commands.bench import (  # noqa: E402
    environment,
    format_table,
    installed_peers,
    random_block_mask,
    run_grid,
    time_ms,
)
from sparsediff.kernels import mask_to_index  # noqa: E402
from sparsediff.kernels.block_sparse.reference import block_sparse_attention_ref  # noqa: E402
from sparsediff.kernels.block_sparse.triton import block_sparse_attention_triton  # noqa: E402


def check_correctness(log) -> bool:
    """Kernel vs float32 reference on the GPU, error budget from PyTorch's own bf16/fp16 error."""
    cases = [
        # b, hq, hkv, nq, nk, d, causal, dtype
        (1, 4, 4, 1024, 1024, 128, False, torch.bfloat16),
        (2, 8, 2, 1000, 1000, 128, True, torch.bfloat16),
        (1, 4, 1, 300, 1100, 64, True, torch.float16),
        (1, 4, 4, 777, 777, 64, False, torch.float16),
        (1, 2, 2, 512, 700, 32, False, torch.bfloat16),
        (1, 2, 2, 512, 512, 80, True, torch.bfloat16),
        (1, 2, 2, 512, 512, 96, False, torch.float16),
        (1, 2, 1, 512, 640, 256, True, torch.bfloat16),
    ]
    ok = True
    for b, hq, hkv, nq, nk, d, causal, dtype in cases:
        q = torch.randn(b, hq, nq, d, device="cuda", dtype=dtype)
        k = torch.randn(b, hkv, nk, d, device="cuda", dtype=dtype)
        v = torch.randn(b, hkv, nk, d, device="cuda", dtype=dtype)
        mask = torch.rand(b, hq, math.ceil(nq / 128), math.ceil(nk / 128), device="cuda") < 0.5
        mask[0, 0, 0] = False  # an empty query block
        index, count = mask_to_index(mask)
        ref, ref_lse = block_sparse_attention_ref(q.float(), k.float(), v.float(), index, count,
                                                  causal=causal, block_size=128)
        lowp, _ = block_sparse_attention_ref(q, k, v, index, count, causal=causal, block_size=128, upcast=False)
        budget = 3 * (lowp.float() - ref).abs().max().item() + 2e-3
        for use_tma in (False, True):
            if use_tma and (d & (d - 1) or torch.cuda.get_device_capability()[0] < 9):
                continue
            out = torch.full_like(q, float("nan"))  # poison: every element must be written
            out, lse = block_sparse_attention_triton(q, k, v, index, count, scale=d ** -0.5, causal=causal,
                                                     block_size=128, return_lse=True, use_tma=use_tma)
            torch.cuda.synchronize()
            err = (out.float() - ref).abs().max().item()
            fin = torch.isfinite(ref_lse)
            lse_err = (lse[fin] - ref_lse[fin]).abs().max().item()
            good = (err <= budget and lse_err < 1e-2 and torch.equal(torch.isneginf(lse), ~fin)
                    and not torch.isnan(out).any())
            ok &= good
            log(f"check {'ok ' if good else 'BAD'} b={b} hq={hq} hkv={hkv} nq={nq} nk={nk} d={d} causal={causal} "
                f"{dtype} tma={use_tma}: err={err:.2e} (budget {budget:.2e}) lse_err={lse_err:.1e}")
    return ok


SWEEP_CONFIGS = [(128, 128, 8, 3), (128, 64, 8, 3), (128, 128, 8, 2), (64, 64, 4, 3), (64, 128, 4, 3),
                 (128, 64, 4, 3), (128, 32, 4, 4), (64, 64, 4, 4)]


def sweep(n, density, log, heads=16, dim=128, configs=SWEEP_CONFIGS, variants=((False, False), (True, False))):
    """Time tile configurations and the TMA path at one size; returns rows sorted by time."""
    gen = torch.Generator(device="cuda").manual_seed(1)
    q, k, v = (torch.randn(1, heads, n, dim, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(3))
    nb = math.ceil(n / 128)
    index, count = mask_to_index(random_block_mask(1, heads, nb, nb, density, "cuda", generator=gen))
    flops = 4 * n * n * dim * heads * count.sum().item() / (heads * nb * nb)
    rows = []
    for config in configs:
        for use_tma, ws in variants:
            try:
                fn = lambda config=config, use_tma=use_tma, ws=ws: block_sparse_attention_triton(
                    q, k, v, index, count, scale=dim ** -0.5, causal=False, block_size=128, return_lse=False,
                    config=config, use_tma=use_tma, warp_specialize=ws)
                t = time_ms(fn, "cuda")
            except Exception as err:  # out of shared memory etc.
                log(f"sweep {config} tma={use_tma}: failed ({type(err).__name__}: {str(err)[:80]})")
                continue
            rows.append({"config": config, "tma": use_tma, "ws": ws, "ms": t, "tflops": flops / t / 1e9})
            log(f"sweep N={n} density={density} {config} tma={use_tma} ws={ws}: {t:.3f} ms, "
                f"{flops / t / 1e9:.0f} TF/s")
    return sorted(rows, key=lambda r: r["ms"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None)
    parser.add_argument("--skip-grid", action="store_true")
    parser.add_argument("--skip-sweep", action="store_true")
    parser.add_argument("--no-flex", action="store_true")
    parser.add_argument("--sizes", default="8192,16384,32768,65536")
    parser.add_argument("--precisions", type=precisions, default="bf16,int8,int8_fp8")
    parser.add_argument("--densities", default="1.0,0.5,0.2,0.1")
    parser.add_argument("--rounds", type=int, default=3,
                        help="each cell's kernels timed this many times in turn, medians kept")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench_kernels.py needs a CUDA GPU; on CPU use `sparsediff bench`.")
        return 2
    env = environment()
    print(json.dumps(env))
    start = time.time()
    result = {"environment": env, "correct": check_correctness(print)}
    if not args.skip_sweep:
        variants = ((False, False), (True, False), (True, True))
        for n, density in [(32768, 0.5), (32768, 0.2), (32768, 0.1), (65536, 0.5)]:
            result[f"sweep_{n}_{density}"] = sweep(n, density, print, variants=variants)
    if not args.skip_grid:
        result["rows"] = run_grid([int(s) for s in args.sizes.split(",")],
                                  [float(x) for x in args.densities.split(",")], heads=16, dim=128,
                                  dtype=torch.bfloat16, device="cuda", flex=not args.no_flex,
                                  extra_dims=[(32768, 64)], peers=installed_peers(True),
                                  precisions=args.precisions, rounds=args.rounds)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"\n{env['device']}, torch {env['torch']}, triton {env.get('triton')}, {time.time() - start:.0f} s")
    print("correctness:", "all ok" if result["correct"] else "FAILURES (see above)")
    for key in [key for key in result if key.startswith("sweep")]:
        best = result[key][:4]
        print(key, "best:", [(r["config"], r["tma"], r["ws"], round(r["ms"], 3), round(r["tflops"])) for r in best])
    if "rows" in result:
        print(format_table(result["rows"]))
        for r in result["rows"]:
            if "flex_ms" in r:
                print(f"N={r['N']} D={r['D']} d={r['density']:.2f}: flex {r['flex_ms']:.3f} ms "
                      f"({r['flex_tflops']:.0f} TF/s), ours/flex speedup {r['speedup_vs_flex']:.2f}, "
                      f"time/(density*cudnn) {r.get('time_over_density_x_cudnn', float('nan')):.2f}")
    return 0 if result["correct"] else 1


if __name__ == "__main__":
    sys.exit(main())
