"""The 64k gap of the block-sparse kernel: is it the key/value working set overflowing L2?

    python benchmarks/bench_kv_chunks.py --out bench_kv_chunks.json     # GPU (~1 min on an H100)
    python benchmarks/bench_kv_chunks.py --quick --out /tmp/kv.json     # CPU smoke run (interpreter, tiny)

At N = 64k, H = 16, D = 128 one head's K and V take 32 MiB, more than an H100 keeps close in L2 (50 MiB
in two halves); at 32k they take 16 MiB. Two measurements, same FLOPs, same run:
- ``near``: every query block keeps the same number of key blocks as ``random``, drawn from the first
  half of the keys only (half the working set). If ``near`` is much faster than ``random`` at 64k and not
  at 32k, the kernel is waiting on key/value traffic.
- ``chunks C``: the key range cut into C equal chunks, the kernel run once per chunk on the kept blocks
  inside it (the sorted index lists split with a gather), the partial outputs merged through their LSE.
  Concurrent programs then share one chunk of K/V. Index splitting is outside the timed region (a plan
  would do it once); the merges are inside.
Relative L2 error of the chunked output against the single call is reported (bf16 partials).

``--variance``: the spread of the single call at density 0.5 over what a benchmark is free to choose, same run:
the random mask's seed, the mask's kind (``exact``: the same kept count in every query block, as the peer table
draws it; ``bernoulli``: each block kept with probability 0.5, plus the diagonal), and the data (keys with a shared
offset of 1, as real keys have, against centred ones), with cuDNN dense and FlexAttention (same blocks) timed
right beside each call. The 64k figure moved by 15 % between scripts.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import statistics
import sys

if "--quick" in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

from sparsediff.commands.bench import dense_fn, environment, flex_fn, random_block_mask, time_ms  # noqa: E402
from sparsediff.kernels import block_sparse_attention, mask_to_index, merge_attention  # noqa: E402


def split_index(index, count, nkb, chunks):
    """Per chunk of key blocks, the (index, count) of the kept blocks inside it (lists are ascending)."""
    width = math.ceil(nkb / chunks)
    pos = torch.arange(index.shape[-1], device=index.device)
    valid = pos < count[..., None].long()
    out = []
    for c in range(chunks):
        lo, hi = c * width, min(nkb, (c + 1) * width)
        start = ((index < lo) & valid).sum(-1, keepdim=True)
        n = ((index >= lo) & (index < hi) & valid).sum(-1).to(torch.int32)
        keep = max(1, int(n.max()))
        cols = (start + torch.arange(keep, device=index.device)).clamp(max=index.shape[-1] - 1)
        sub = torch.gather(index, -1, cols)
        sub = torch.where(torch.arange(keep, device=index.device) < n[..., None], sub, torch.zeros_like(sub))
        out.append((sub.contiguous(), n.contiguous()))
    return out


def chunked(q, k, v, parts, block_size):
    out, lse = block_sparse_attention(q, k, v, *parts[0], block_size=block_size, return_lse=True, check_ids=False)
    for index, count in parts[1:]:
        o, s = block_sparse_attention(q, k, v, index, count, block_size=block_size, return_lse=True, check_ids=False)
        out, lse = merge_attention(out, lse, o, s)
    return out


def near_mask(nb, density, heads, device, gen):
    """Same kept count per query block as the random mask, drawn from the first half of the key blocks."""
    keep = max(1, round(density * nb))
    half = max(keep, nb // 2)
    scores = torch.rand(1, heads, nb, half, device=device, generator=gen)
    mask = torch.zeros(1, heads, nb, nb, dtype=torch.bool, device=device)
    mask[..., :half] = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, scores.topk(keep, -1).indices, True)
    return mask


def bernoulli_mask(nb, density, heads, device, gen):
    """Each (query block, key block) kept with probability ``density``, plus the diagonal (bench_eight_bit's)."""
    mask = torch.rand(1, heads, nb, nb, device=device, generator=gen) < density
    return mask | torch.eye(nb, dtype=torch.bool, device=device)


def variance_rows(n, heads, dim, bs, device, dtype) -> list[dict]:
    """The single call at density 0.5 over mask seeds, mask kinds and key offsets (module docstring)."""
    nb = math.ceil(n / bs)
    rows = []
    for data_seed, key_offset in ((0, 0.0), (0, 1.0), (1, 0.0)):
        gen = torch.Generator(device=device).manual_seed(data_seed)
        q, k, v = (torch.randn(1, heads, n, dim, device=device, dtype=dtype, generator=gen) for _ in range(3))
        k = k + key_offset
        kinds = (("exact", 0), ("exact", 1), ("exact", 2), ("bernoulli", 0), ("bernoulli", 1)) if data_seed == 0 \
            and key_offset == 0 else (("exact", 0), ("bernoulli", 0))
        for kind, seed in kinds:
            mgen = torch.Generator(device=device).manual_seed(100 + seed)
            mask = random_block_mask(1, heads, nb, nb, 0.5, device, generator=mgen) if kind == "exact" \
                else bernoulli_mask(nb, 0.5, heads, device, mgen)
            index, count = mask_to_index(mask)
            ms = time_ms(lambda: block_sparse_attention(q, k, v, index, count, block_size=bs, check_ids=False),
                         device)
            row = {"n": n, "mask": kind, "mask_seed": seed, "data_seed": data_seed, "key_offset": key_offset,
                   "kept": float(count.float().mean() / nb), "ms": ms}
            if device == "cuda":  # the peers right beside it: each ratio under the same clocks
                row["cudnn_ms"] = time_ms(dense_fn(q, k, v, "cudnn"), device)
                row["flex_ms"] = time_ms(flex_fn(q, k, v, index, count, bs), device)
                row["x_cudnn"], row["x_flex"] = row["cudnn_ms"] / ms, row["flex_ms"] / ms
            rows.append(row)
            ratios = f", {row['x_cudnn']:.2f}x cuDNN, {row['x_flex']:.2f}x Flex" if "x_cudnn" in row else ""
            print(f"variance n {n} mask {kind} seed {seed} data {data_seed} key offset {key_offset}: "
                  f"kept {row['kept']:.3f}, {ms:.3f} ms{ratios}", flush=True)
    if rows and "x_cudnn" in rows[0]:
        print(f"variance n {n}: median {statistics.median(r['x_cudnn'] for r in rows):.2f}x cuDNN "
              f"(range {min(r['x_cudnn'] for r in rows):.2f}-{max(r['x_cudnn'] for r in rows):.2f}), median "
              f"{statistics.median(r['x_flex'] for r in rows):.2f}x Flex "
              f"(range {min(r['x_flex'] for r in rows):.2f}-{max(r['x_flex'] for r in rows):.2f})", flush=True)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", default="32768,65536")
    parser.add_argument("--densities", default="1.0,0.5")
    parser.add_argument("--chunks", default="2,4")
    parser.add_argument("--variance", action="store_true", help="only the spread over masks and data (density 0.5)")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default="bench_kv_chunks.json")
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available() and not args.quick
    device = "cuda" if cuda else "cpu"
    heads, dim, bs = (16, 128, 128) if cuda else (2, 32, 32)
    dtype = torch.bfloat16 if cuda else torch.float32
    sizes = [int(x) for x in args.n.split(",")] if cuda else [256]
    rows = []
    if args.variance:
        rows = [row for n in sizes for row in variance_rows(n, heads, dim, bs, device, dtype)]
        sizes = []
    for n in sizes:
        gen = torch.Generator(device=device).manual_seed(0)
        q, k, v = (torch.randn(1, heads, n, dim, device=device, dtype=dtype, generator=gen) for _ in range(3))
        nb = math.ceil(n / bs)
        for density in (float(x) for x in args.densities.split(",")):
            row = {"n": n, "density": density}
            index, count = mask_to_index(random_block_mask(1, heads, nb, nb, density, device, generator=gen))
            plain = lambda index=index, count=count: block_sparse_attention(
                q, k, v, index, count, block_size=bs, check_ids=False)
            row["random_ms"] = time_ms(plain, device)
            if density <= 0.5:
                near = mask_to_index(near_mask(nb, density, heads, device, gen))
                row["near_ms"] = time_ms(lambda near=near: block_sparse_attention(
                    q, k, v, *near, block_size=bs, check_ids=False), device)
            ref = plain().float()
            for c in (int(x) for x in args.chunks.split(",")):
                parts = split_index(index, count, nb, c)
                fn = lambda parts=parts: chunked(q, k, v, parts, bs)
                row[f"chunks{c}_ms"] = time_ms(fn, device)
                row[f"chunks{c}_x_single"] = row["random_ms"] / row[f"chunks{c}_ms"]
                row[f"chunks{c}_rel_l2"] = float((fn().float() - ref).norm() / ref.norm())
            rows.append(row)
            print("  ".join(f"{key} {val:.4g}" if isinstance(val, float) else f"{key} {val}"
                            for key, val in row.items()), flush=True)
    with open(args.out, "w") as f:
        json.dump({"benchmark": "bench_kv_chunks", "date": datetime.datetime.now().isoformat(timespec="seconds"),
                   "environment": environment(), "rows": rows}, f, indent=2, allow_nan=False)
    print(f"JSON: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
