"""Where a LoSA block's time goes: the first (refresh) step and the cached steps, kernel by kernel.

    python benchmarks/profile_losa.py [--prefixes 131072] [--blocks 32,128] [--cuda-graphs] [--host] [--top 8]
                                      [--union-splits N]

With ``SPARSEDIFF_PDL=1`` the LoSA step kernels launch with programmatic dependent launch (sm_90+).

Same inputs as ``bench_blockdiff.py --structured`` (one layer, GQA 32/8, D=128, bf16, 16 steps).
For each case: synchronised wall time of the first step and the mean of the others, then the top
kernels by GPU time of each (torch.profiler), so that launch overhead (wall minus GPU time) and the
costly kernels can be told apart. Also: how often the union scored by the CUDA kernel on the active rows
equals the float32 PyTorch scoring of all rows (same active set, same block means), per step and KV head;
with ``--host`` the Python functions a replayed block spends its host time in (cProfile), for LoSA and
FlashBlock with ``cuda_graphs=True``.
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


def union_agreement(qs, kbuf, prefix, args, threshold=0.05, sparsity=0.8, block_size=128):
    """Kernel-scored vs float32-scored union over the steps of one block: (equal sets, mean overlap)."""
    from sparsediff.kernels import block_stats
    from sparsediff.methods.losa import mean_key_rank, rank_blocks, token_change
    from sparsediff.methods.losa.step_kernels import mean_key_score
    from sparsediff.methods.prefix_attention import active_first_rows

    scale = args.dim ** -0.5
    nkb = prefix // block_size
    keep = max(1, round(nkb * (1 - sparsity)))
    means = block_stats(kbuf[:, :, : nkb * block_size], block_size).mean.float() * scale
    means_t, bias = means.transpose(-1, -2).contiguous(), torch.zeros(nkb, device=kbuf.device)
    equal = total = 0
    overlap = 0.0
    for i in range(1, len(qs)):
        active = token_change(qs[i], qs[i - 1]) >= threshold
        want = mean_key_rank(qs[i].float(), active, means_t, bias, keep, per_kv_head=True)
        rows = active_first_rows(qs[i], active, args.kv_heads, block_size)
        got = rank_blocks(mean_key_score(rows.stacked, rows.n_rows, means_t.transpose(-1, -2), bias), keep)
        for a, b in zip(want.flatten(0, 2).tolist(), got.flatten(0, 2).tolist()):
            equal += set(a) == set(b)
            overlap += len(set(a) & set(b)) / keep
            total += 1
    # Last step's scoring alone: the kernel on the stacked rows (means split once) vs the float32 PyTorch path.
    import triton.testing

    from sparsediff.methods.losa.step_kernels import split_means

    split = split_means(means)
    kernel_ms = triton.testing.do_bench(
        lambda: rank_blocks(mean_key_score(rows.stacked, rows.n_rows, means, bias, split=split), keep))
    torch_ms = triton.testing.do_bench(lambda: mean_key_rank(qs[-1].float(), active, means_t, bias, keep, True))
    return equal / total, overlap / total, kernel_ms, torch_ms


def host_profile(args, prefix, nq, counter):
    """cProfile of 4 replayed blocks (graphs captured before), LoSA and FlashBlock: top functions by own time."""
    import cProfile
    import io
    import pstats

    qs, (kbuf, vbuf), kbs, vbs = make_block(prefix, nq, args, "cuda", torch.bfloat16, seed=prefix + nq)
    for name in ("losa", "flashblock"):
        m = make_method(name, min_seq_len=0, cuda_graphs=True)

        def block():
            counter[0] += 1
            new_block(counter[0])
            for i in range(args.steps):
                kbuf[:, :, prefix:].copy_(kbs[i])
                vbuf[:, :, prefix:].copy_(vbs[i])
                with denoising_step(i, args.steps):
                    m(qs[i], kbuf, vbuf, layer="l")

        for _ in range(3):
            block()
        torch.cuda.synchronize()
        prof = cProfile.Profile()
        start = time.perf_counter()
        prof.enable()
        for _ in range(4):
            block()
        prof.disable()
        host = (time.perf_counter() - start) * 1e3 / 4
        torch.cuda.synchronize()
        text = io.StringIO()
        pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(18)
        print(f"\n== host profile {name}+graphs, prefix {prefix}, block {nq}: {host:.2f} ms host per block "
              f"(under cProfile)")
        print("\n".join(line for line in text.getvalue().splitlines() if line.strip())[-3000:])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prefixes", default="131072")
    parser.add_argument("--blocks", default="32,128")
    parser.add_argument("--cuda-graphs", action="store_true")
    parser.add_argument("--union", default="kv_head")
    parser.add_argument("--union-splits", type=int, default=None, help="LoSA's union_splits (default: its choice)")
    parser.add_argument("--host", action="store_true", help="also profile the host side of replayed blocks")
    parser.add_argument("--top", type=int, default=8, help="kernels listed per table")
    args = parser.parse_args()
    args.heads, args.kv_heads, args.dim, args.steps, args.active_frac, args.structured = 32, 8, 128, 16, 0.25, True
    counter = [100]
    for prefix in [int(p) for p in args.prefixes.split(",")]:
        for nq in [int(b) for b in args.blocks.split(",")]:
            qs, (kbuf, vbuf), kbs, vbs = make_block(prefix, nq, args, "cuda", torch.bfloat16, seed=prefix + nq)
            m = make_method("losa", min_seq_len=0, cuda_graphs=args.cuda_graphs, union=args.union,
                            union_splits=args.union_splits)

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

            equal, overlap, kernel_ms, torch_ms = union_agreement(qs, kbuf, prefix, args)
            print(f"\n== prefix {prefix}, block {nq}: kernel-scored union equals the float32 one in {equal:.1%} of "
                  f"(step, KV head); mean overlap {overlap:.4f}; scoring {kernel_ms * 1e3:.1f} us (kernel, active "
                  f"rows) vs {torch_ms * 1e3:.1f} us (float32 PyTorch, all rows), each with its ranking sort")
            for _ in range(3):
                walls = block()
            print(f"\n== prefix {prefix}, block {nq}, graphs={args.cuda_graphs}: first step {walls[0]:.3f} ms, "
                  f"others {sum(walls[1:]) / (len(walls) - 1):.3f} ms (synchronised wall)")
            for name, which in (("first step", 0), ("cached steps (sum of 15)", 1)):
                prof = profile(activities=[ProfilerActivity.CUDA])
                block(prof, which)
                total, rows = kernel_table(prof, args.top)
                print(f"-- {name}: GPU busy {total:.3f} ms")
                for t, count, key in rows:
                    print(f"   {t:8.3f} ms  x{count:<4d} {key}")
            if args.host:
                host_profile(args, prefix, nq, counter)
    return 0


if __name__ == "__main__":
    sys.exit(main())
