"""Hopper Gluon block-sparse kernel: correctness against the float32 reference, then speed against the
Triton kernel and SDPA cuDNN in the same run, with its schedule options as an ablation.

    python benchmarks/bench_gluon.py --out bench_gluon.json
    python benchmarks/bench_gluon.py --precision int8 --out bench_gluon_int8.json   # the 8-bit schedule ablation
    python benchmarks/bench_gluon.py --precision int8 --variants default,"4 stages" --rounds 3   # interleaved

B=1, H=16, D=128, bf16, random per-head masks; TFLOP/s counts 4*N^2*D*H*density. With ``--precision int8`` or
``int8_fp8`` the variants run the Gluon 8-bit kernel (quantization included), whose smaller K (and V) tiles
leave shared memory for a fourth and fifth stage; the 16-bit kernel is timed beside it as the reference, and each
variant's relative L2 error against float32 attention on the same blocks (at the first size) is checked.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sparsediff.commands.bench import environment, random_block_mask, sdpa_fn, time_rounds  # noqa: E402
from sparsediff.kernels import mask_to_index  # noqa: E402
from sparsediff.kernels.block_sparse.gluon import block_sparse_attention_gluon  # noqa: E402
from sparsediff.kernels.block_sparse.reference import block_sparse_attention_ref  # noqa: E402
from sparsediff.kernels.block_sparse.triton import block_sparse_attention_triton  # noqa: E402

VARIANTS = {
    "default": {},  # 3 stages, in-warpgroup overlap, no ping-pong
    "ping-pong + overlap": dict(pingpong=True),
    "neither": dict(pingpong=False, overlap=False),  # ptxas then overlaps P·V(j-1) with the softmax itself
    "2 stages": dict(stages=2),
    "default, no LSE": dict(return_lse=False),
    "exp2 1/4 on FMA": dict(exp2_poly=1),
    "exp2 2/4 on FMA": dict(exp2_poly=2),
    "tree_reduce": dict(tree_reduce=True),  # row max and sum as shallow trees
}


def check(log) -> bool:
    cases = [
        # b, hq, hkv, nq, nk, d, dtype, density, causal
        (1, 4, 4, 1024, 1024, 128, torch.bfloat16, 0.5, False),
        (2, 8, 2, 1000, 1000, 128, torch.bfloat16, 0.5, False),
        (1, 4, 1, 300, 1100, 64, torch.float16, 0.6, False),
        (1, 4, 4, 777, 777, 64, torch.float16, 1.0, False),
        (1, 2, 2, 2048, 4096, 128, torch.float16, 0.3, False),
        (2, 8, 2, 1000, 1000, 128, torch.bfloat16, 0.7, True),
        (1, 4, 1, 300, 1100, 64, torch.float16, 0.7, True),
    ]
    ok = True
    for b, hq, hkv, nq, nk, d, dtype, density, causal in cases:
        q = torch.randn(b, hq, nq, d, device="cuda", dtype=dtype)
        k = torch.randn(b, hkv, nk, d, device="cuda", dtype=dtype)
        v = torch.randn(b, hkv, nk, d, device="cuda", dtype=dtype)
        mask = torch.rand(b, hq, math.ceil(nq / 128), math.ceil(nk / 128), device="cuda") < density
        mask[0, 0, 0] = False  # an empty query block
        index, count = mask_to_index(mask)
        ref, ref_lse = block_sparse_attention_ref(q.float(), k.float(), v.float(), index, count, block_size=128,
                                                  causal=causal)
        lowp, _ = block_sparse_attention_ref(q, k, v, index, count, block_size=128, upcast=False, causal=causal)
        budget = 3 * (lowp.float() - ref).abs().max().item() + 2e-3
        tri, tri_lse = block_sparse_attention_triton(q, k, v, index, count, scale=d ** -0.5, causal=causal,
                                                     block_size=128, return_lse=True)
        for name, opts in VARIANTS.items():
            if opts.get("return_lse") is False:
                continue
            out, lse = block_sparse_attention_gluon(q, k, v, index, count, scale=d ** -0.5, return_lse=True,
                                                    causal=causal, **opts)
            err = (out.float() - ref).abs().max().item()
            fin = torch.isfinite(ref_lse)
            lse_err = (lse[fin] - ref_lse[fin]).abs().max().item()
            empty_ok = bool(torch.isneginf(lse[~fin]).all()) and bool((out[~fin] == 0).all())
            good = err <= budget and lse_err < 1e-2 and empty_ok
            ok &= good
            log(f"check {b},{hq},{hkv},{nq},{nk},{d},{dtype},{density},causal={causal} {name}: "
                f"err {err:.2e} (budget {budget:.2e}, "
                f"triton {(tri.float() - ref).abs().max().item():.2e}) lse {lse_err:.1e} empty {empty_ok} "
                f"{'OK' if good else 'FAIL'}")
    # A broadcast index (one mask for every batch and head), on (B, N, H, D) tensors seen as (B, H, N, D).
    q, k, v = (torch.randn(2, 512, 4, 128, device="cuda", dtype=torch.bfloat16).transpose(1, 2) for _ in range(3))
    index, count = mask_to_index(torch.rand(1, 1, 4, 4, device="cuda") < 0.5)
    ref, _ = block_sparse_attention_ref(q.float(), k.float(), v.float(), index, count, block_size=128)
    out, _ = block_sparse_attention_gluon(q, k, v, index, count, scale=128 ** -0.5, return_lse=False)
    good = (out.float() - ref).abs().max().item() < 2e-2
    ok &= good
    log(f"check broadcast index {'OK' if good else 'FAIL'}")
    return ok


EIGHT_BIT_VARIANTS = {
    "default": {},
    "ping-pong + overlap": dict(pingpong=True),
    "2 stages": dict(stages=2),
    "4 stages": dict(stages=4),
    "5 stages": dict(stages=5),
    "per-token keys": dict(int8_tile_k=False),
    "ids loaded in place": dict(prefetch_ids=False),
    "exp2 1/4 on FMA": dict(exp2_poly=1),
    "exp2 2/4 on FMA": dict(exp2_poly=2),
    "P in registers": dict(fp8_p_shared=False),  # int8_fp8 only: byte permutes instead of shared memory
    "no in-warpgroup overlap": dict(overlap=False),
    "tree_reduce": dict(tree_reduce=True),
    "pair tiles": dict(pair_tiles=True),  # two key blocks per softmax step (gluon_pairs.py): int8_fp8's default
    "one block per step": dict(pair_tiles=False),  # int8's default
    "pair tiles + tree_reduce": dict(pair_tiles=True, tree_reduce=True),
}


def bench_eight_bit(sizes, densities, precision, log, variants=None, rounds=1):
    """The Gluon 8-bit kernel's schedule variants against the 16-bit kernel, same inputs and blocks; with
    ``rounds`` > 1 every kernel of a cell runs that many times in turn and keeps its median."""
    from sparsediff.kernels.block_sparse.gluon import block_sparse_attention_gluon_int8

    names = variants or list(EIGHT_BIT_VARIANTS)
    rows, ok = [], True
    h, d = 16, 128
    for i, n in enumerate(sizes):
        g = torch.Generator(device="cuda").manual_seed(n)
        q, k, v = (torch.randn(1, h, n, d, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))
        k = k + 1.0  # keys with a shared offset, as real keys have
        for density in densities:
            nb = n // 128
            index, count = mask_to_index(random_block_mask(1, h, nb, nb, density, "cuda", generator=g))
            ref = block_sparse_attention_ref(q.float(), k.float(), v.float(), index, count, block_size=128)[0] \
                if i == 0 else None
            row = {"n": n, "density": density, "precision": precision, "rounds": rounds}
            fns = {"bf16": lambda: block_sparse_attention_gluon(q, k, v, index, count, scale=d ** -0.5,
                                                                return_lse=True)}
            for name in names:
                fn = (lambda o: lambda: block_sparse_attention_gluon_int8(
                    q, k, v, index, count, scale=d ** -0.5, return_lse=True, pv_fp8=precision == "int8_fp8",
                    **o))(EIGHT_BIT_VARIANTS[name])
                try:
                    fn()
                except Exception as err:  # a schedule that does not fit (shared memory): recorded, not fatal
                    row[name] = {"error": f"{type(err).__name__}: {str(err).strip().splitlines()[0][:120]}"}
                    continue
                fns[name] = fn
            times = time_rounds(fns, "cuda", rounds)
            bf16 = statistics.median(times["bf16"])
            row["bf16"] = {"ms": bf16, "rounds_ms": times["bf16"]}
            for name in [x for x in fns if x != "bf16"]:
                ms = statistics.median(times[name])
                row[name] = {"ms": ms, "x_bf16": bf16 / ms, "rounds_ms": times[name]}
                if ref is not None:
                    err = float((fns[name]()[0].float() - ref).norm() / ref.norm())
                    row[name]["rel_l2"] = err
                    ok &= err < (0.03 if precision == "int8" else 0.05)
            rows.append(row)
            log(f"N={n} density={density:.2f} {precision}: bf16 {bf16:.2f} ms | " + " | ".join(
                f"{name} {row[name]['ms']:.2f} ms {row[name]['x_bf16']:.2f}x" if "ms" in row[name] else
                f"{name} -" for name in names))
    return rows, ok


def bench(sizes, densities, log, variants=None, rounds=1):
    """The 16-bit kernel's schedule variants against the Triton kernel and cuDNN dense; with ``rounds`` > 1 all
    of a cell's kernels run that many times in turn and keep their medians."""
    rows = []
    h, d = 16, 128
    names = variants or list(VARIANTS)
    for n in sizes:
        g = torch.Generator(device="cuda").manual_seed(n)
        q, k, v = (torch.randn(1, h, n, d, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))
        for density in densities:
            nb = n // 128
            index, count = mask_to_index(random_block_mask(1, h, nb, nb, density, "cuda", generator=g))
            dens = count.float().mean().item() / nb
            flops = 4 * n * n * d * h * dens
            fns = {"cudnn dense": sdpa_fn(q, k, v, "cudnn"),
                   "triton": lambda: block_sparse_attention_triton(q, k, v, index, count, scale=d ** -0.5,
                                                                   causal=False, block_size=128, return_lse=True)}
            for name in names:
                fns[name] = (lambda o: lambda: block_sparse_attention_gluon(
                    q, k, v, index, count, scale=d ** -0.5, **{"return_lse": True, **o}))(VARIANTS[name])
            times = time_rounds(fns, "cuda", rounds)
            cudnn = statistics.median(times["cudnn dense"])
            row = {"n": n, "density": round(dens, 3), "cudnn_dense_ms": cudnn, "rounds": rounds}
            for name in [x for x in fns if x != "cudnn dense"]:
                ms = statistics.median(times[name])
                row[name] = {"ms": ms, "tflops": flops / ms / 1e9, "x_cudnn": cudnn / ms, "rounds_ms": times[name]}
            rows.append(row)
            log(f"N={n} density={dens:.2f} cudnn dense {cudnn:.2f} ms | " + " | ".join(
                f"{name} {row[name]['ms']:.2f} ms {row[name]['tflops']:.0f} TF/s {row[name]['x_cudnn']:.2f}x"
                for name in fns if name != "cudnn dense"))
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="16384,32768,65536")
    parser.add_argument("--densities", default="1.0,0.5,0.1")
    parser.add_argument("--precision", default="bf16", choices=["bf16", "int8", "int8_fp8"])
    parser.add_argument("--variants", default=None,
                        help="comma-separated schedule variants to run (default all; 16-bit: " + ", ".join(VARIANTS)
                        + "; 8-bit: " + ", ".join(EIGHT_BIT_VARIANTS) + ")")
    parser.add_argument("--rounds", type=int, default=1, help="each kernel timed this many times in turn per "
                        "cell, medians kept")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    lines = []

    def log(msg):
        print(msg, flush=True)
        lines.append(msg)

    sizes = [int(s) for s in args.sizes.split(",")]
    densities = [float(x) for x in args.densities.split(",")]
    variants = args.variants.split(",") if args.variants else None
    if args.precision != "bf16":
        unknown = set(variants or []) - set(EIGHT_BIT_VARIANTS)
        if unknown:
            parser.error(f"unknown variants {sorted(unknown)}; known: {', '.join(EIGHT_BIT_VARIANTS)}")
        rows, ok = bench_eight_bit(sizes, densities, args.precision, log, variants, args.rounds)
    else:
        unknown = set(variants or []) - set(VARIANTS)
        if unknown:
            parser.error(f"unknown variants {sorted(unknown)}; known: {', '.join(VARIANTS)}")
        ok = check(log)
        rows = bench(sizes, densities, log, variants, args.rounds) if ok else []
    if args.out:
        Path(args.out).write_text(json.dumps({"env": environment(), "correct": ok, "rows": rows}, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
