"""Block diffusion attention: time per block and error vs dense for dense, FlashBlock, LoSA and
FlashBlock + sparse external attention.

    python benchmarks/bench_blockdiff.py --out bench_blockdiff.json    # H100: prefix 16k/64k/128k, blocks 32/128
    python benchmarks/bench_blockdiff.py --quick --out /tmp/b.json     # CPU smoke run (small shapes)
    python benchmarks/bench_blockdiff.py --structured --cuda-graphs     # also with cuda_graphs=True (eager: False)

One attention layer, B=1, GQA 32 query / 8 key-value heads, D=128, bf16, 16 denoising steps per block.
Calls follow the block-diffusion convention: q = the active block, k/v = [prefix | block].
Inputs are random normal (never zero); with ``--structured`` each KV head also gets a few "hot"
prefix blocks (5%) whose keys share a direction the group's queries hold, so attention concentrates
as in trained models (on purely random inputs attention is spread evenly over 100k+ keys and any
approximation's relative error is large: those errors are a worst case, not a quality number).
Queries evolve over the steps with a synthetic process: each step a random ``--active-frac`` share
of the block's tokens moves a lot (relative change 0.3) and the rest barely (0.01), standing in for
the tokens being unmasked; LoSA's measured share of active tokens (from its own stats) is reported
next to its time. The block's keys/values are redrawn the same way and written into one persistent
``[prefix | block]`` buffer before each step, as a preallocated KV cache does (two small copies per
step, in every timed variant, dense included): CUDA graphs read the prefix in place.
Time per block = ``triton.testing.do_bench`` median of the whole 16-step block (a fresh block each
repetition, so first-step refreshes are included; with ``--cuda-graphs`` FlashBlock (plain mode) and LoSA
capture their first and cached steps once per case: their state is sized for the buffer and kept across
blocks; FlashBlock + sparse captures once per block; ``*_captures`` counts them over the timed blocks).
Errors are relative L2 vs dense per step, on the third block after a cache reset (the first blocks of a
fresh cache run eager or capture). Graphed variants are checked bit for bit against the eager outputs of
that block; their GPU-busy time is not profiled (same kernels as eager).

Prefix attention: ``dense_prefix_sdpa_ms`` times dense SDPA of the block's queries to the prefix keys only
(16 steps, same buffer copies), ``dense_block_sdpa_ms`` to the block's own keys only. The methods compute
prefix and in-block attention in one call, so their prefix-attention time is not separable: the
``*_prefix_speedup`` columns divide the dense prefix-only time by the method's whole time, a lower bound on
the method's prefix-attention speedup. ``*_step_host_ms``: per step, the time until the call returns
(GPU idle before it), i.e. the host's own work; ``*_step_ms`` adds the wait for the GPU.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sparsediff.bench import environment, time_ms  # noqa: E402
from sparsediff.eval.blockdiff_probe import evolve  # noqa: E402
from sparsediff.methods import available_selectors, denoising_step, make_method, new_block  # noqa: E402
from sparsediff.methods.dense import dense_attention  # noqa: E402


def make_block(prefix, nq, args, device, dtype, seed):
    gen = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(1, args.heads, nq, args.dim, device=device, dtype=dtype, generator=gen)
    kv_shape = (1, args.kv_heads, prefix + nq, args.dim)
    k = torch.randn(kv_shape, device=device, dtype=dtype, generator=gen)
    v = torch.randn(kv_shape, device=device, dtype=dtype, generator=gen)
    if args.structured:
        nkb = -(-prefix // 128)
        hot = torch.randperm(nkb, device=device, generator=gen)[: max(1, nkb // 20)]
        dirs = torch.randn(args.kv_heads, args.dim, device=device, generator=gen)
        # q.k / sqrt(D) grows by 6 on hot keys: their softmax weight stands out from 100k+ others.
        dirs = math.sqrt(6 * math.sqrt(args.dim)) * dirs / dirs.norm(dim=-1, keepdim=True)
        rows = (hot[:, None] * 128 + torch.arange(128, device=device)).flatten().clamp(max=prefix - 1)
        k[0, :, rows] += dirs[:, None].to(dtype)
        q += dirs.repeat_interleave(args.heads // args.kv_heads, 0)[None, :, None].to(dtype)
    qs, kbs, vbs = [q], [k[:, :, prefix:].clone()], [v[:, :, prefix:].clone()]
    for _ in range(args.steps - 1):
        qs.append(evolve(qs[-1], args.active_frac, gen))
        kbs.append(evolve(kbs[-1], args.active_frac, gen))
        vbs.append(evolve(vbs[-1], args.active_frac, gen))
    return qs, (k, v), kbs, vbs


def gpu_busy_ms(fn):
    """Summed kernel time of one ``fn()`` (CUDA only): the GPU work without launch gaps, to tell
    compute from the Python / launch overhead that per-layer eager calls carry."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    total = 0.0
    for event in prof.key_averages():
        total += getattr(event, "self_device_time_total", getattr(event, "self_cuda_time_total", 0.0))
    return total / 1e3


def methods(args):
    out = {
        "flashblock": make_method("flashblock", min_seq_len=0, cuda_graphs=False),
        "losa": make_method("losa", min_seq_len=0, threshold=args.threshold, sparsity=args.sparsity,
                            union=args.union, cuda_graphs=False),
    }
    if args.selector in available_selectors():
        out["flashblock+sparse"] = make_method("flashblock", min_seq_len=0, sparse_selector=args.selector,
                                               sparsity=args.sparsity, cuda_graphs=False)
    if args.cuda_graphs:
        # The default (cuda_graphs=None): graphs once a buffer has been seen twice, as users get them.
        out |= {f"{name}+graphs": make_method(m, cuda_graphs=None) for name, m in list(out.items())}
    return out


def one_case(prefix, nq, args, device, dtype, log):
    qs, (kbuf, vbuf), kbs, vbs = make_block(prefix, nq, args, device, dtype, seed=prefix + nq)
    steps = args.steps
    counter = [0]

    def load(i):  # the step's block keys / values into the persistent buffer
        kbuf[:, :, prefix:].copy_(kbs[i])
        vbuf[:, :, prefix:].copy_(vbs[i])

    def sdpa_block():
        for i in range(steps):
            load(i)
            F.scaled_dot_product_attention(qs[i], kbuf, vbuf, enable_gqa=True)

    def sdpa_part_block(lo, hi):
        for i in range(steps):
            load(i)
            F.scaled_dot_product_attention(qs[i], kbuf[:, :, lo:hi], vbuf[:, :, lo:hi], enable_gqa=True)

    def kernel_block():
        for i in range(steps):
            load(i)
            dense_attention(qs[i], kbuf, vbuf, return_lse=True)

    def method_block(m, record=None):
        counter[0] += 1
        new_block(counter[0])  # every repetition is a fresh block: first-step work is included
        for i in range(steps):
            load(i)
            with denoising_step(i, steps):
                out = m(qs[i], kbuf, vbuf, layer="l")
            if record is not None:
                record.append(out)

    def step_times(m):
        counter[0] += 1
        new_block(counter[0])
        times, host = [], []
        for i in range(steps):
            load(i)
            torch.cuda.synchronize()
            start = time.perf_counter()
            with denoising_step(i, steps):
                m(qs[i], kbuf, vbuf, layer="l")
            host.append((time.perf_counter() - start) * 1e3)
            torch.cuda.synchronize()
            times.append((time.perf_counter() - start) * 1e3)
        return times, host

    row = {"prefix": prefix, "block": nq, "steps": steps, "heads": args.heads, "kv_heads": args.kv_heads,
           "dim": args.dim, "structured": args.structured}
    row["dense_sdpa_ms"] = time_ms(sdpa_block, device)
    row["dense_prefix_sdpa_ms"] = time_ms(lambda: sdpa_part_block(0, prefix), device)
    row["dense_block_sdpa_ms"] = time_ms(lambda: sdpa_part_block(prefix, prefix + nq), device)
    if device == "cuda":
        row["dense_sdpa_gpu_ms"] = gpu_busy_ms(sdpa_block)
    row["dense_kernel_ms"] = time_ms(kernel_block, device)
    refs = []
    for i in range(steps):
        load(i)
        refs.append(dense_attention(qs[i], kbuf, vbuf).float())
    eager_outs = {}
    for name, m in methods(args).items():
        first = counter[0]
        row[f"{name}_ms"] = time_ms(lambda m=m: method_block(m), device)
        row[f"{name}_captures"], row[f"{name}_blocks_timed"] = m._cache.captures, counter[0] - first
        if device == "cuda" and not name.endswith("+graphs"):
            row[f"{name}_gpu_ms"] = gpu_busy_ms(lambda m=m: method_block(m))
        if device == "cuda":  # where a block's time goes: each step alone, synchronised (no overlap)
            row[f"{name}_step_ms"], row[f"{name}_step_host_ms"] = step_times(m)
        outs = []
        m.reset()
        for _ in range(2):  # a fresh cache's first blocks run eager or capture; the third replays what it can
            method_block(m)
        method_block(m, outs)
        row[f"{name}_err"] = [float((o.float() - r).norm() / r.norm()) for o, r in zip(outs, refs)]
        base = name.removesuffix("+graphs")
        if name == base:
            eager_outs[name] = outs
        else:  # same kernels on the same inputs: equal to the eager outputs bit for bit
            row[f"{name}_equal_eager"] = all(torch.equal(a, b) for a, b in zip(outs, eager_outs[base]))
            row[f"{name}_graphs_held"] = len(m._cache.graphs())
            row[f"{name}_graph_mib"] = sum(g.nbytes for g in m._cache.graphs()) / 2**20
        if base == "losa":
            rep = [r for r in m.step_report() if r["block"] == counter[0]]
            row[f"{name}_active_share"] = sum(r["active_share"] for r in rep[1:]) / max(len(rep) - 1, 1)
            row[f"{name}_union_density"] = sum(r["union_density"] for r in rep[1:]) / max(len(rep) - 1, 1)
    for name in methods(args):
        row[f"{name}_speedup"] = row["dense_sdpa_ms"] / row[f"{name}_ms"]
        row[f"{name}_prefix_speedup"] = row["dense_prefix_sdpa_ms"] / row[f"{name}_ms"]  # a lower bound
    log(json.dumps(row))
    return row


def table(rows, names):
    head = (["prefix", "block", "dense ms", "dense prefix-only ms"]
            + [f"{n} ms (x whole / x prefix >=)" for n in names] + ["LoSA active", "max err FB/LoSA"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [str(r["prefix"]), str(r["block"]), f"{r['dense_sdpa_ms']:.2f}", f"{r['dense_prefix_sdpa_ms']:.2f}"]
        cells += [f"{r[n + '_ms']:.2f} ({r[n + '_speedup']:.2f} / {r[n + '_prefix_speedup']:.2f})" for n in names]
        cells += [f"{r['losa_active_share']:.2f}",
                  f"{max(r['flashblock_err']):.1e}/{max(r['losa_err']):.1e}"]
        lines.append("| " + " | ".join(cells) + " |")
    if rows and "dense_sdpa_gpu_ms" in rows[0]:
        lines += ["", "GPU-busy ms per block (summed kernel time, no launch gaps):",
                  "| prefix | block | dense | " + " | ".join(names) + " |", "|" + "---|" * (3 + len(names))]
        for r in rows:
            lines.append(f"| {r['prefix']} | {r['block']} | {r['dense_sdpa_gpu_ms']:.2f} | "
                         + " | ".join(f"{r[n + '_gpu_ms']:.2f}" if n + "_gpu_ms" in r else "-" for n in names) + " |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small CPU run (fp32, PyTorch path)")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--prefixes", default="16384,65536,131072")
    parser.add_argument("--blocks", default="32,128")
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--active-frac", type=float, default=0.25, help="synthetic share of moving tokens per step")
    parser.add_argument("--threshold", type=float, default=0.05, help="LoSA threshold")
    parser.add_argument("--sparsity", type=float, default=0.8, help="LoSA / FlashBlock+sparse sparsity")
    parser.add_argument("--selector", default="ba_att", help="selector of FlashBlock+sparse")
    parser.add_argument("--union", default="kv_head", choices=["kv_head", "head"], help="LoSA's union of key blocks")
    parser.add_argument("--structured", action="store_true", help="hot prefix blocks the queries align with")
    parser.add_argument("--cuda-graphs", action="store_true",
                        help="also time each method with its default CUDA graphs (plain columns: cuda_graphs=False)")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() and not args.quick else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    if args.quick:
        args.prefixes, args.blocks, args.steps, args.heads, args.kv_heads, args.dim = "1024", "32", 4, 4, 2, 64
    env = environment()
    print(f"device: {env['device']}; torch {env['torch']}; triton {env.get('triton')}; {dtype}")
    rows = []
    for prefix in (int(p) for p in args.prefixes.split(",")):
        for nq in (int(b) for b in args.blocks.split(",")):
            rows.append(one_case(prefix, nq, args, device, dtype, print))
            if args.out:  # after every case: a run cut short keeps what it measured
                args.out.write_text(json.dumps({"environment": env, "args": vars(args) | {"out": str(args.out)},
                                                "rows": rows}, indent=2))
    print(table(rows, list(methods(args))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
