"""Kernel variants on the GPU: the default block-sparse forward against the hand-pipelined one.

    python benchmarks/bench_kernel_variants.py --out variants.json

``pipeline_qk=True`` (``kernels/block_sparse_pipelined.py``) issues the next tile's QK^T before the
current tile's softmax, so that the tensor cores can run it while the CUDA cores do the softmax.
Each variant is timed with and without warp specialization and with 2 and 3 pipeline stages, on the
same inputs and masks: B=1, H=16, D=128, bf16, random inputs; cuDNN dense in the same run for a ratio.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sparsediff.bench import environment, random_block_mask, time_ms  # noqa: E402
from sparsediff.kernels import mask_to_index  # noqa: E402
from sparsediff.kernels.block_sparse_triton import block_sparse_attention_triton  # noqa: E402
from sparsediff.kernels.reference import block_sparse_attention_ref  # noqa: E402

VARIANTS = [(False, True, 3), (False, False, 3), (True, False, 3), (True, True, 3), (True, False, 2), (True, True, 2)]


def check(log) -> bool:
    ok = True
    gen = torch.Generator(device="cuda").manual_seed(0)
    for (hq, hkv, n, d, causal, gain) in [(4, 4, 1024, 128, False, 1.0), (8, 2, 1000, 128, True, 3.0),
                                          (4, 4, 777, 64, False, 3.0), (4, 1, 1100, 128, True, 1.0)]:
        q, k, v = (torch.randn(1, h, n, d, device="cuda", dtype=torch.bfloat16, generator=gen)
                   for h in (hq, hkv, hkv))
        q = q * gain
        nb = math.ceil(n / 128)
        index, count = mask_to_index(random_block_mask(1, hq, nb, nb, 0.5, "cuda", generator=gen))
        ref, ref_lse = block_sparse_attention_ref(q.float(), k.float(), v.float(), index, count, causal=causal)
        for pipe in (False, True):
            out, lse = block_sparse_attention_triton(q, k, v, index, count, scale=d ** -0.5, causal=causal,
                                                     block_size=128, return_lse=True, pipeline_qk=pipe)
            fin = torch.isfinite(ref_lse)
            rel = ((out.float() - ref).norm() / ref.norm()).item()
            lse_err = (lse[fin] - ref_lse[fin]).abs().max().item()
            good = rel < 1e-2 and lse_err < 1e-2 and torch.equal(torch.isneginf(lse), ~fin)
            ok &= good
            log(f"check {'ok ' if good else 'BAD'} hq={hq} hkv={hkv} n={n} d={d} causal={causal} gain={gain} "
                f"pipeline_qk={pipe}: rel={rel:.2e} lse_err={lse_err:.1e}")
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None)
    parser.add_argument("--sizes", default="32768,65536")
    args = parser.parse_args()
    env = environment()
    result = {"environment": env, "correct": check(print), "rows": []}
    heads, dim = 16, 128
    for n in [int(s) for s in args.sizes.split(",")]:
        gen = torch.Generator(device="cuda").manual_seed(n)
        q, k, v = (torch.randn(1, heads, n, dim, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(3))
        cudnn = time_ms(lambda: _sdpa(q, k, v), "cuda")
        nb = math.ceil(n / 128)
        for density in (1.0, 0.5, 0.1):
            index, count = mask_to_index(random_block_mask(1, heads, nb, nb, density, "cuda", generator=gen))
            flops = 4 * n * n * dim * heads * count.sum().item() / (heads * nb * nb)
            for pipe, ws, stages in VARIANTS:
                try:
                    t = time_ms(lambda: block_sparse_attention_triton(
                        q, k, v, index, count, scale=dim ** -0.5, causal=False, block_size=128, return_lse=True,
                        config=(128, 128, 8, stages), warp_specialize=ws, pipeline_qk=pipe), "cuda")
                except Exception as err:  # e.g. out of shared memory or registers
                    print(f"n={n} density={density} pipe={pipe} ws={ws} stages={stages}: failed "
                          f"({type(err).__name__}: {str(err)[:100]})")
                    continue
                row = {"n": n, "density": density, "pipeline_qk": pipe, "ws": ws, "stages": stages, "ms": t,
                       "tflops": flops / t / 1e9, "cudnn_dense_ms": cudnn, "x_cudnn": cudnn / t}
                result["rows"].append(row)
                print(json.dumps(row))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"\n{env['device']}; correctness: {'all ok' if result['correct'] else 'FAILURES'}")
    print("| N | density | pipeline_qk | warp spec. | stages | ms | TF/s | x cuDNN dense |")
    print("|---|---|---|---|---|---|---|---|")
    for r in result["rows"]:
        print(f"| {r['n']} | {r['density']} | {r['pipeline_qk']} | {r['ws']} | {r['stages']} | {r['ms']:.3f} | "
              f"{r['tflops']:.0f} | {r['x_cudnn']:.2f} |")
    return 0 if result["correct"] else 1


def _sdpa(q, k, v):
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.CUDNN_ATTENTION):
        return F.scaled_dot_product_attention(q, k, v)


if __name__ == "__main__":
    sys.exit(main())
