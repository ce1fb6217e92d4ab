"""Block diffusion attention: time per block and error vs dense for dense, FlashBlock, LoSA and
FlashBlock + sparse external attention.

    python benchmarks/bench_blockdiff.py --out bench_blockdiff.json    # H100: prefix 16k/64k/128k, blocks 32/128
    python benchmarks/bench_blockdiff.py --quick --out /tmp/b.json     # CPU smoke run (small shapes)
    python benchmarks/bench_blockdiff.py --structured --cuda-graphs     # also with the default CUDA graphs
    python benchmarks/bench_blockdiff.py --structured --cuda-graphs --host-graph   # + whole blocks as one graph
    python benchmarks/bench_blockdiff.py --structured --host-graph --pdl --losa-splits 8,16   # variants, same run

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

Dense peers, each over the same 16 steps and buffer copies: SDPA with its default backend choice
(``dense_sdpa_ms``), SDPA forced to FlashAttention-2 (``dense_flash_ms``) and to cuDNN (``dense_cudnn_ms``),
with ``--flex`` compiled FlexAttention. On an H100 SDPA's default picks cuDNN, up to 3.5x slower than the
flash backend at these short-query shapes (flash splits the keys over the SMs); every ``*_speedup`` is
taken against the fastest peer of the run (``dense_best``), ``*_speedup_sdpa`` against SDPA's default.
With ``--host-graph`` each dense peer and each method (a fresh ``cuda_graphs=False`` instance, its kernels
running inside the host's capture) is also timed as one CUDA graph of the whole block, as a host that graphs
its whole denoising step runs it: ``*_graph_ms``, attention time without per-call host overhead, and
``*_graph_equal_eager`` (bit for bit against the eager outputs).

Prefix attention: ``dense_*_prefix_ms`` times each dense peer of the block's queries to the prefix keys only
(16 steps, same buffer copies), ``dense_block_sdpa_ms`` SDPA to the block's own keys only. The methods compute
prefix and in-block attention in one call, so their prefix-attention time is not separable: the
``*_prefix_speedup`` columns divide the best dense prefix-only time by the method's whole time, a lower bound on
the method's prefix-attention speedup. ``*_step_host_ms``: per step, the time until the call returns
(GPU idle before it), i.e. the host's own work; ``*_step_ms`` adds the wait for the GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sparsediff.commands.bench import environment, time_ms  # noqa: E402
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


@contextlib.contextmanager
def pdl_env(on):
    """SPARSEDIFF_PDL=1 (``on``) or 0 inside (kernels read it at each launch, graphs when captured), as before
    after; ``on=None`` leaves it as it is."""
    if on is None:  # nothing set, nothing to restore (the variable may well be unset)
        yield
        return
    before = os.environ.get("SPARSEDIFF_PDL")
    os.environ["SPARSEDIFF_PDL"] = "1" if on else "0"
    try:
        yield
    finally:
        if before is None:
            del os.environ["SPARSEDIFF_PDL"]
        else:
            os.environ["SPARSEDIFF_PDL"] = before


def method_specs(args):
    """name -> (method, settings): the variants timed, each made fresh where a run needs its own instance."""
    specs = {
        "flashblock": ("flashblock", {"min_seq_len": 0, "cuda_graphs": False}),
        "losa": ("losa", {"min_seq_len": 0, "threshold": args.threshold, "sparsity": args.sparsity,
                          "union": args.union, "cuda_graphs": False}),
    }
    if args.pdl:  # the same methods with programmatic dependent launch (SPARSEDIFF_PDL=1 while they run)
        specs |= {f"{name}+pdl": specs[name] for name in ("flashblock", "losa")}
    for n in args.losa_splits:  # LoSA with its union attention split in n key chunks (default: chosen for the GPU)
        specs[f"losa/s{n}"] = ("losa", specs["losa"][1] | {"union_splits": n})
    if args.selector in available_selectors():
        specs["flashblock+sparse"] = ("flashblock", {"min_seq_len": 0, "sparse_selector": args.selector,
                                                     "sparsity": args.sparsity, "cuda_graphs": False})
    if args.cuda_graphs:
        # The default (cuda_graphs=None): graphs once a buffer has been seen twice, as users get them.
        specs |= {f"{name}+graphs": (m, kw | {"cuda_graphs": None}) for name, (m, kw) in list(specs.items())}
    return specs


def dense_peers(args, device):
    """name -> step(q, k, v): the dense attention a block-diffusion loop would otherwise run."""
    def sdpa(backend):
        def step(q, k, v):
            if backend is None:
                return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        return step

    peers = {"sdpa": sdpa(None)}
    if device == "cuda":
        peers |= {"flash": sdpa(SDPBackend.FLASH_ATTENTION), "cudnn": sdpa(SDPBackend.CUDNN_ATTENTION)}
        if args.flex:
            from torch.nn.attention.flex_attention import flex_attention

            compiled = torch.compile(flex_attention, dynamic=False)
            peers["flex"] = lambda q, k, v: compiled(q, k, v, enable_gqa=True)
    return peers


def block_graph_ms(block_fn):
    """``(ms, outputs)``: ``block_fn(record)`` (a whole block, all steps) captured as one CUDA graph, as a
    host that graphs its whole denoising step runs it, and replayed: attention time without host overhead."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up outside the capture (allocations, autotuning, first blocks)
        block_fn(None)
        block_fn(None)
    torch.cuda.current_stream().wait_stream(stream)
    graph, record = torch.cuda.CUDAGraph(), []
    with torch.cuda.graph(graph):
        block_fn(record)
    graph.replay()
    torch.cuda.synchronize()
    return time_ms(graph.replay, "cuda"), record, graph


def one_case(prefix, nq, args, device, dtype, log):
    qs, (kbuf, vbuf), kbs, vbs = make_block(prefix, nq, args, device, dtype, seed=prefix + nq)
    steps = args.steps
    counter = [0]

    def load(i):  # the step's block keys / values into the persistent buffer
        kbuf[:, :, prefix:].copy_(kbs[i])
        vbuf[:, :, prefix:].copy_(vbs[i])

    def peer_block(step, lo=0, hi=None, record=None):
        for i in range(steps):
            load(i)
            out = step(qs[i], kbuf[:, :, lo:hi], vbuf[:, :, lo:hi])
            if record is not None:
                record.append(out)

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
    peers = dense_peers(args, device)
    for peer, step in peers.items():
        row[f"dense_{peer}_ms"] = time_ms(lambda step=step: peer_block(step), device)
        row[f"dense_{peer}_prefix_ms"] = time_ms(lambda step=step: peer_block(step, 0, prefix), device)
        if args.host_graph:
            row[f"dense_{peer}_graph_ms"] = block_graph_ms(lambda rec, step=step: peer_block(step, record=rec))[0]
    # The ratios are taken against the fastest dense peer of this run (SDPA's default pick may be slower).
    row["dense_best"] = min(peers, key=lambda p: row[f"dense_{p}_ms"])
    row["dense_best_ms"] = row[f"dense_{row['dense_best']}_ms"]
    row["dense_best_prefix_ms"] = min(row[f"dense_{p}_prefix_ms"] for p in peers)
    if args.host_graph:
        row["dense_best_graph_ms"] = min(row[f"dense_{p}_graph_ms"] for p in peers)
    row["dense_block_sdpa_ms"] = time_ms(lambda: peer_block(peers["sdpa"], prefix, prefix + nq), device)
    if device == "cuda":
        row["dense_sdpa_gpu_ms"] = gpu_busy_ms(lambda: peer_block(peers["sdpa"]))
    row["dense_kernel_ms"] = time_ms(kernel_block, device)
    refs = []
    for i in range(steps):
        load(i)
        refs.append(dense_attention(qs[i], kbuf, vbuf).float())
    eager_outs = {}
    specs = method_specs(args)
    for name, (method, settings) in specs.items():
        # With --pdl, programmatic dependent launch for the +pdl variants only (else as the caller's environment)
        with pdl_env(("+pdl" in name) if args.pdl else None):
            m = make_method(method, **settings)
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
            timed_block = counter[0]
            row[f"{name}_err"] = [float((o.float() - r).norm() / r.norm()) for o, r in zip(outs, refs)]
            base = name.removesuffix("+graphs")
            if name == base:
                eager_outs[name] = outs
                if "+pdl" in name:  # the same kernels, launched earlier: the same bits
                    row[f"{name}_equal_without_pdl"] = all(
                        torch.equal(a, b) for a, b in zip(outs, eager_outs[name.replace("+pdl", "")]))
                if args.host_graph and device == "cuda":  # a fresh eager instance inside the host's own graph
                    fresh = make_method(method, **settings)
                    ms, record, _ = block_graph_ms(lambda rec, fresh=fresh: method_block(fresh, rec))
                    row[f"{name}_graph_ms"] = ms
                    row[f"{name}_graph_equal_eager"] = all(torch.equal(a, b) for a, b in zip(record, outs))
            else:  # same kernels on the same inputs: equal to the eager outputs bit for bit
                row[f"{name}_equal_eager"] = all(torch.equal(a, b) for a, b in zip(outs, eager_outs[base]))
                row[f"{name}_graphs_held"] = len(m._cache.graphs())
                row[f"{name}_graph_mib"] = sum(g.nbytes for g in m._cache.graphs()) / 2**20
            if base.startswith("losa"):
                rep = [r for r in m.step_report() if r["block"] == timed_block]
                row[f"{name}_active_share"] = sum(r["active_share"] for r in rep[1:]) / max(len(rep) - 1, 1)
                row[f"{name}_union_density"] = sum(r["union_density"] for r in rep[1:]) / max(len(rep) - 1, 1)
    for name in specs:
        row[f"{name}_speedup"] = row["dense_best_ms"] / row[f"{name}_ms"]
        row[f"{name}_speedup_sdpa"] = row["dense_sdpa_ms"] / row[f"{name}_ms"]  # SDPA's default backend
        row[f"{name}_prefix_speedup"] = row["dense_best_prefix_ms"] / row[f"{name}_ms"]  # a lower bound
        if f"{name}_graph_ms" in row:
            row[f"{name}_graph_speedup"] = row["dense_best_graph_ms"] / row[f"{name}_graph_ms"]
    log(json.dumps(row))
    return row


def table(rows, names):
    peers = [k[len("dense_"):-len("_ms")] for k in rows[0] if k.startswith("dense_") and k.endswith("_ms")
             and k[len("dense_"):-len("_ms")] in ("sdpa", "flash", "cudnn", "flex")] if rows else []
    head = (["prefix", "block"] + [f"dense {p} ms" for p in peers] + ["dense prefix-only ms (best)"]
            + [f"{n} ms (x best / x prefix >= / x sdpa)" for n in names] + ["LoSA active", "max err FB/LoSA"])
    lines = ["Wall time per block; ratios against the fastest dense peer of the run:", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [str(r["prefix"]), str(r["block"])] + [f"{r[f'dense_{p}_ms']:.2f}" for p in peers]
        cells += [f"{r['dense_best_prefix_ms']:.2f}"]
        cells += [f"{r[n + '_ms']:.2f} ({r[n + '_speedup']:.2f} / {r[n + '_prefix_speedup']:.2f} / "
                  f"{r[n + '_speedup_sdpa']:.2f})" for n in names]
        cells += [f"{r['losa_active_share']:.2f}",
                  f"{max(r['flashblock_err']):.1e}/{max(r['losa_err']):.1e}"]
        lines.append("| " + " | ".join(cells) + " |")
    graphed = [n for n in names if rows and f"{n}_graph_ms" in rows[0]]
    if graphed:
        lines += ["", "Whole block captured as one CUDA graph by the host (no host overhead), ms (x best dense):", "",
                  "| prefix | block | " + " | ".join(f"dense {p}" for p in peers) + " | " + " | ".join(graphed)
                  + " | graph == eager |", "|" + "---|" * (3 + len(peers) + len(graphed))]
        for r in rows:
            lines.append(f"| {r['prefix']} | {r['block']} | "
                         + " | ".join(f"{r[f'dense_{p}_graph_ms']:.2f}" for p in peers) + " | "
                         + " | ".join(f"{r[n + '_graph_ms']:.2f} ({r[n + '_graph_speedup']:.2f})" for n in graphed)
                         + f" | {all(r[n + '_graph_equal_eager'] for n in graphed)} |")
    if rows and "dense_sdpa_gpu_ms" in rows[0]:
        lines += ["", "GPU-busy ms per block (summed kernel time, no launch gaps):", "",
                  "| prefix | block | dense sdpa | " + " | ".join(names) + " |", "|" + "---|" * (3 + len(names))]
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
    parser.add_argument("--host-graph", action="store_true",
                        help="also time each whole block captured as one CUDA graph by the host (GPU only)")
    parser.add_argument("--flex", action="store_true", help="FlexAttention (compiled) as a dense peer too")
    parser.add_argument("--pdl", action="store_true",
                        help="also time FlashBlock and LoSA with programmatic dependent launch (columns *+pdl)")
    parser.add_argument("--losa-splits", default="",
                        help="comma-separated split counts: also time LoSA with union_splits=n (columns losa/sN)")
    args = parser.parse_args()
    args.losa_splits = [int(n) for n in args.losa_splits.split(",") if n]
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
    print(table(rows, list(method_specs(args))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
