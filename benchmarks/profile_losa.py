"""Where a LoSA block's time goes: the first (refresh) step and the cached steps, kernel by kernel.

    python benchmarks/profile_losa.py [--prefixes 131072] [--blocks 32,128] [--cuda-graphs]

Same inputs as ``bench_blockdiff.py --structured`` (one layer, GQA 32/8, D=128, bf16, 16 steps).
For each case: synchronised wall time of the first step and the mean of the others, then the top
kernels by GPU time of each (torch.profiler), so that launch overhead (wall minus GPU time) and the
costly kernels can be told apart.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_blockdiff import make_block  # noqa: E402

from sparsediff.methods import denoising_step, make_method, new_block  # noqa: E402


def kernel_table(prof, top=8):
    rows = []
    for e in prof.key_averages():
        t = getattr(e, "self_device_time_total", 0.0)
        if t > 0:
            rows.append((t / 1e3, e.count, e.key[:70]))
    rows.sort(reverse=True)
    total = sum(r[0] for r in rows)
    return total, rows[:top]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prefixes", default="131072")
    parser.add_argument("--blocks", default="32,128")
    parser.add_argument("--cuda-graphs", action="store_true")
    parser.add_argument("--union", default="kv_head")
    args = parser.parse_args()
    args.heads, args.kv_heads, args.dim, args.steps, args.active_frac, args.structured = 32, 8, 128, 16, 0.25, True
    counter = [100]
    for prefix in [int(p) for p in args.prefixes.split(",")]:
        for nq in [int(b) for b in args.blocks.split(",")]:
            qs, (kbuf, vbuf), kbs, vbs = make_block(prefix, nq, args, "cuda", torch.bfloat16, seed=prefix + nq)
            m = make_method("losa", min_seq_len=0, cuda_graphs=args.cuda_graphs, union=args.union)

            def step(i):
                kbuf[:, :, prefix:].copy_(kbs[i])
                vbuf[:, :, prefix:].copy_(vbs[i])
                with denoising_step(i, args.steps):
                    m(qs[i], kbuf, vbuf, layer="l")

            def block(prof=None, which=0):
                """One block; ``prof`` covers its first step (``which=0``) or all later steps (``which=1``)."""
                counter[0] += 1
                new_block(counter[0])
                walls = []
                for i in range(args.steps):
                    torch.cuda.synchronize()
                    start = time.perf_counter()
                    if prof is not None and i == which:
                        prof.start()
                    step(i)
                    torch.cuda.synchronize()
                    if prof is not None and i == (0 if which == 0 else args.steps - 1):
                        prof.stop()
                    walls.append((time.perf_counter() - start) * 1e3)
                return walls

            for _ in range(3):
                walls = block()
            print(f"\n== prefix {prefix}, block {nq}, graphs={args.cuda_graphs}: first step {walls[0]:.3f} ms, "
                  f"others {sum(walls[1:]) / (len(walls) - 1):.3f} ms (synchronised wall)")
            for name, which in (("first step", 0), ("cached steps (sum of 15)", 1)):
                prof = profile(activities=[ProfilerActivity.CUDA])
                block(prof, which)
                total, rows = kernel_table(prof)
                print(f"-- {name}: GPU busy {total:.3f} ms")
                for t, count, key in rows:
                    print(f"   {t:8.3f} ms  x{count:<4d} {key}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
