"""Where the host time of a block-diffusion block goes (FlashBlock / LoSA with CUDA graphs), by Python function.

    python benchmarks/profile_blockdiff_host.py --prefix 16384 --block 32     # H100: the host-bound case
    python benchmarks/profile_blockdiff_host.py --quick                        # CPU smoke run (no graphs)

Runs the benchmark's block loop (``bench_blockdiff.py``: one layer, GQA 32/8, D=128, bf16, 16 steps, the
block's keys / values written into a persistent buffer before each step) for each method and prints
(1) wall ms per block and host ms per block (until the last call returns, GPU still busy), (2) the
top functions by own time under ``cProfile`` (which inflates Python time; read the shares, not the
totals), and (3) the host µs of each part of a step, timed alone over many repetitions.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sparsediff.methods import denoising_step, make_method, new_block  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prefix", type=int, default=16384)
    parser.add_argument("--block", type=int, default=32)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--methods", default="flashblock,losa")
    parser.add_argument("--blocks", type=int, default=40, help="blocks timed per method")
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    cuda = torch.cuda.is_available() and not args.quick
    dev, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    if args.quick:
        args.prefix, args.steps, args.blocks = 1024, 4, 3
    heads, kv_heads, dim = (32, 8, 128) if not args.quick else (4, 2, 64)
    gen = torch.Generator(device=dev).manual_seed(0)
    kbuf = torch.randn(1, kv_heads, args.prefix + args.block, dim, device=dev, dtype=dtype, generator=gen)
    vbuf = torch.randn_like(kbuf)
    qs = [torch.randn(1, heads, args.block, dim, device=dev, dtype=dtype, generator=gen) for _ in range(args.steps)]
    kbs = [torch.randn(1, kv_heads, args.block, dim, device=dev, dtype=dtype, generator=gen) for _ in range(args.steps)]
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    counter = [0]

    def load(i):
        kbuf[:, :, args.prefix:].copy_(kbs[i])
        vbuf[:, :, args.prefix:].copy_(kbs[i])

    def block(m):
        counter[0] += 1
        new_block(counter[0])
        for i in range(args.steps):
            load(i)
            with denoising_step(i, args.steps):
                m(qs[i], kbuf, vbuf, layer="l")

    def host_us(fn, n=300):
        for _ in range(20):
            fn()
        sync()
        start = time.perf_counter()
        for _ in range(n):
            fn()
        host = (time.perf_counter() - start) / n * 1e6
        sync()
        return host

    print(f"device {torch.cuda.get_device_name() if cuda else 'cpu'}; prefix {args.prefix}, block {args.block}")
    def step_context():
        with denoising_step(1, args.steps):
            pass

    print(f"part: kv row copy (one of two per step) {host_us(lambda: kbuf[:, :, args.prefix:].copy_(kbs[0])):.1f} us; "
          f"denoising_step enter + exit {host_us(step_context):.1f} us")
    for name in args.methods.split(","):
        m = make_method(name, min_seq_len=0, cuda_graphs=cuda)
        for _ in range(3):  # capture and warm up
            block(m)
        sync()
        start = time.perf_counter()
        for _ in range(args.blocks):
            block(m)
        host = (time.perf_counter() - start) / args.blocks * 1e3
        sync()
        wall = (time.perf_counter() - start) / args.blocks * 1e3
        counter[0] += 1
        new_block(counter[0])
        with denoising_step(0, args.steps):  # a block's first step, then the same cached call over and over
            m(qs[0], kbuf, vbuf, layer="l")

        def cached(m=m):
            with denoising_step(1, args.steps):
                m(qs[1], kbuf, vbuf, layer="l")

        print(f"\n== {name}: wall {wall:.3f} ms / block, host {host:.3f} ms / block; "
              f"a cached call alone {host_us(cached):.1f} us host")
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(10):
            block(m)
        prof.disable()
        sync()
        text = io.StringIO()
        pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(args.top)
        rows = [line for line in text.getvalue().splitlines() if "ncalls" in line or ":" in line or "{" in line]
        print("\n".join(rows[: args.top + 1]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
