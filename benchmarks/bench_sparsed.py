"""SparseD over a denoising schedule: total attention time vs dense (cuDNN SDPA) and vs BA-Att selecting
blocks at every step.

    python benchmarks/bench_sparsed.py --out bench_sparsed.json      # H100: 64k x 50 steps, 16k x 1,024 steps
    python benchmarks/bench_sparsed.py --quick --out /tmp/q.json     # CPU smoke run (small shapes)

Bidirectional attention of one layer, B=1, H=32, D=128, bf16 (a LLaDA-8B-like layer), random normal
inputs. Not every step is run: the three kinds of SparseD step are timed with
``triton.testing.do_bench`` (medians) and the schedule total is extrapolated from them:
  dense-window step (SDPA through the method), switch step (dense pass with LSE + tile-mass pass +
  top-k; once per layer), cached-pattern step (block-sparse kernel only).
  total_sparsed = n_dense * t_dense_window + t_switch + (n_steps - n_dense - 1) * t_cached
  total_dense   = n_steps * t_cudnn
  total_ba_att  = n_dense * t_cudnn + (n_steps - n_dense) * t_ba_att (selection + attention each step)
Also reported: the pattern cache size per layer and the peak memory of the switch step, against
the N x N float32 map the reference implementation materialises.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sparsediff.commands.bench import environment, sdpa_fn, time_ms  # noqa: E402
from sparsediff.methods import available_methods, denoising_step, make_method, new_generation  # noqa: E402
from sparsediff.methods.dense import dense_attention  # noqa: E402


def one_case(n, steps, args, device, dtype, log):
    gen = torch.Generator(device=device).manual_seed(0)
    shape = (1, args.heads, n, args.dim)
    q, k, v = (torch.randn(shape, device=device, dtype=dtype, generator=gen) for _ in range(3))
    keep = args.keep_ratio
    method = make_method("sparsed", keep_ratio=keep, dense_step_fraction=args.skip, block_size=args.block_size,
                         min_seq_len=0)
    n_dense = max(method.config.dense_steps, math.ceil(args.skip * steps))
    switch = n_dense

    def at_step(step, fn):
        def run():
            with denoising_step(step, steps):
                return fn()
        return run

    row = {"N": n, "steps": steps, "heads": args.heads, "dim": args.dim, "keep_ratio": keep, "dense_steps": n_dense}
    t_cudnn = time_ms(sdpa_fn(q, k, v, "cudnn" if device == "cuda" else None), device)
    t_window = time_ms(at_step(0, lambda: method(q, k, v, layer="l")), device)

    def switch_call():
        method.reset()  # forces the selection every time it is timed
        return method(q, k, v, layer="l")

    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base_mem = torch.cuda.memory_allocated()
    at_step(switch, switch_call)()
    if device == "cuda":
        torch.cuda.synchronize()
        row["switch_peak_extra_MiB"] = (torch.cuda.max_memory_allocated() - base_mem) / 2**20
    row["nxn_map_MiB"] = args.heads * n * n * 4 / 2**20
    row["pattern_cache_MiB_per_layer"] = method.cache_bytes() / 2**20
    row["density"] = method.stats["density"]
    t_switch = time_ms(at_step(switch, switch_call), device)
    at_step(switch, switch_call)()  # leave a cached pattern behind
    t_cached = time_ms(at_step(switch + 1, lambda: method(q, k, v, layer="l")), device)
    with denoising_step(switch + 1, steps):
        out = method(q, k, v, layer="l")
    ref = dense_attention(q, k, v)
    row["rel_err_random_inputs"] = float((out.float() - ref.float()).norm() / ref.float().norm())
    row.update(t_cudnn_ms=t_cudnn, t_dense_window_ms=t_window, t_switch_ms=t_switch, t_cached_ms=t_cached)
    row["total_dense_ms"] = steps * t_cudnn
    row["total_sparsed_ms"] = n_dense * t_window + t_switch + (steps - n_dense - 1) * t_cached
    row["speedup_vs_dense"] = row["total_dense_ms"] / row["total_sparsed_ms"]
    if "ba_att" in available_methods():
        ba = make_method("ba_att", sparsity=1.0 - keep, block_size=args.block_size, min_seq_len=0)
        t_ba = time_ms(lambda: ba(q, k, v, layer="l"), device)
        row["t_ba_att_step_ms"] = t_ba
        row["total_ba_att_per_step_ms"] = n_dense * t_cudnn + (steps - n_dense) * t_ba
        row["speedup_vs_ba_att_per_step"] = row["total_ba_att_per_step_ms"] / row["total_sparsed_ms"]
    new_generation()
    log(json.dumps(row))
    return row


def table(rows):
    head = ["N", "steps", "dense ms", "SparseD ms", "x vs dense", "BA-Att/step ms", "x vs BA-Att", "switch ms",
            "cached ms", "cache MiB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        ba = r.get("total_ba_att_per_step_ms")
        lines.append("| " + " | ".join([
            str(r["N"]), str(r["steps"]), f"{r['total_dense_ms']:.1f}", f"{r['total_sparsed_ms']:.1f}",
            f"{r['speedup_vs_dense']:.2f}", f"{ba:.1f}" if ba else "n/a",
            f"{r['speedup_vs_ba_att_per_step']:.2f}" if ba else "n/a", f"{r['t_switch_ms']:.2f}",
            f"{r['t_cached_ms']:.2f}", f"{r['pattern_cache_MiB_per_layer']:.2f}"]) + " |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small CPU run (fp32, PyTorch path)")
    parser.add_argument("--out", type=Path, default=None, help="write the rows and environment as JSON here")
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--keep-ratio", type=float, default=0.3, help="SparseD's select (README: 0.3)")
    parser.add_argument("--skip", type=float, default=0.2, help="SparseD's skip: dense share of steps (0.2)")
    parser.add_argument("--cases", default="65536x50,16384x1024", help="NxSTEPS pairs, comma separated")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() and not args.quick else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    if args.quick:
        args.heads, args.dim, args.block_size = 2, 64, 64
        args.cases = "1024x50,512x64"
    env = environment()
    print(f"device: {env['device']}; torch {env['torch']}; triton {env.get('triton')}; {dtype}")
    rows = []
    for case in args.cases.split(","):
        n, steps = (int(x) for x in case.lower().split("x"))
        rows.append(one_case(n, steps, args, device, dtype, print))
    if args.out:
        args.out.write_text(json.dumps({"environment": env, "args": vars(args) | {"out": str(args.out)},
                                        "rows": rows}, indent=2))
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
