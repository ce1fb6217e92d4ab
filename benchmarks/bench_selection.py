"""Cost of BA-Att's default selection, stage by stage, as a share of dense cuDNN attention at the same size.

    python benchmarks/bench_selection.py --out bench_selection.json           # H100: N 16k/32k/64k, H 16, D 128
    python benchmarks/bench_selection.py --quick --out /tmp/sel.json          # CPU smoke run

Stages: the sampled-row block mass (``kernels.sampled_mass``, rows per block 2/4/8), the global mass threshold
(``mass_threshold``: a sort on CUDA, against ``kthvalue``), the kernel's launch shapes, the per-row top-k
into the index form,
the whole plan (default BA-Att, its block-64 variant and the paper's pooled setting), and the dropped-block
pooled terms (``compensate``). bf16, B=1, random normal inputs (never zeros). Medians of
``triton.testing.do_bench`` on CUDA; the threshold variants are checked to keep the same number of blocks.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import time

import torch

from sparsediff.kernels.dropped_blocks import add_dropped_blocks
from sparsediff.kernels.sampled_mass import sampled_block_mass
from sparsediff.methods import make_method
from sparsediff.methods.block_select import layout, mass_threshold, select_from_scores


def timer(fn, cuda: bool) -> float:
    if cuda:
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
    fn()
    times = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def dense_ms(q, k, v, cuda):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    backend = SDPBackend.CUDNN_ATTENTION if cuda else SDPBackend.MATH

    def run():
        with sdpa_kernel(backend):
            return sdpa(q, k, v)
    return timer(run, cuda)


def bench(n, heads, dim, dtype, device, cuda, sparsity) -> dict:
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, heads, n, dim, device=device, dtype=dtype) for _ in range(3))
    base = dense_ms(q, k, v, cuda)
    row = {"n": n, "cudnn_ms": base, "stages": {}}

    def stage(name, fn):
        ms = timer(fn, cuda)
        row["stages"][name] = {"ms": ms, "pct_of_dense": 100 * ms / base}
        print(f"  N={n:6d} {name:34s} {ms:8.3f} ms  {100 * ms / base:6.2f}% of cuDNN dense")

    # The default launch (LAUNCH: automatic key splits on CUDA) for each block size and row count.
    for bs, rows in ((128, 2), (128, 4), (128, 8), (64, 4), (64, 8)):
        stage(f"sampled_mass bs{bs} rows{rows}", lambda bs=bs, rows=rows: sampled_block_mass(
            q, k, block_size=bs, rows=rows))
    if cuda:  # launch shapes of the sampled-mass kernel: rows per program, key tile, warps
        from sparsediff.kernels import sampled_mass as sm

        nqb = -(-n // 128)
        row["auto_key_splits_rows4"] = sm.auto_key_splits(-(-nqb // 16) * heads, nqb, sm.sm_count(q.device))
        for m, bn, w, s in ((64, 64, 4, 1), (64, 64, 4, 2), (64, 64, 4, 3), (64, 64, 4, 4), (64, 64, 4, 8),
                            (128, 64, 8, 1), (128, 128, 8, 1), (256, 64, 8, 1), (128, 128, 8, 4)):
            stage(f"sampled_mass rows4 launch m{m} n{bn} w{w} s{s}", lambda m=m, bn=bn, w=w, s=s: sm._mass_triton(
                q, k, block_size=128, rows=4, scale=q.shape[-1] ** -0.5, causal=False,
                launch=dict(rows_per_program=m, block_n=bn, num_warps=w, key_splits=s)))
    mass = sampled_block_mass(q, k, block_size=128, rows=4)
    density = 1 - sparsity
    lay = layout(n, n, 128, q.device, density=density, local_window=128)
    free = lay.visible & ~lay.forced
    vals = mass.masked_fill(~free, -1.0).reshape(1, -1)
    want = lay.total * heads - int(lay.n_forced.sum()) * heads
    kept = {}
    for name, fn in (("threshold (mass_threshold)", lambda: mass_threshold(vals, want)),
                     ("threshold kthvalue", lambda: vals.kthvalue(vals.shape[-1] - want + 1, dim=-1).values)):
        stage(name, fn)
        kept[name] = int((vals >= fn().view(-1, 1)).sum())
    row["threshold_kept"] = kept
    scores = torch.log(mass)
    stage("select (global, window, top-k)", lambda: select_from_scores(
        scores, nq=n, nk=n, block_size=128, density=density, allocation="global", local_window=128,
        weight_by_count=False))
    for spec in ("ba_att", "ba_att/fine_sample_rows=none", "ba_att/sample_rows=2", "ba_att/sample_rows=8",
                 "ba_att/block_size=64", "ba_att/block_size=64/sample_rows=8", "ba_att_paper",
                 "xattention/allocation=global/local_window=none", "fixed"):  # the peers' rules
        method = make_method(spec, sparsity=sparsity, min_seq_len=0)
        stage(f"plan {spec}", lambda method=method: method.plan(q, k, v))
    method = make_method("ba_att", sparsity=sparsity, min_seq_len=0)
    plan = method.plan(q, k, v)
    out, lse = method.attend(q, plan, causal=False, scale=None, return_lse=True, compensate=False)
    stage("compensate (pooled dropped blocks)", lambda: add_dropped_blocks(
        q, plan.k, plan.v, plan.block_index, plan.block_count, out, lse, block_size=plan.block_size))
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", default="16384,32768,65536")
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, CPU-friendly")
    parser.add_argument("--out", default="bench_selection.json")
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    dtype = torch.bfloat16 if cuda else torch.float32
    if args.quick:
        args.n, args.heads, args.dim = "2048", 2, 64
    import triton

    env = {"device": torch.cuda.get_device_name() if cuda else platform.processor() or "cpu",
           "torch": torch.__version__, "triton": triton.__version__,
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "heads": args.heads, "dim": args.dim, "dtype": str(dtype), "batch": 1, "sparsity": args.sparsity}
    print(f"{env['device']}  torch {env['torch']}  triton {env['triton']}  {env['date']}")
    rows = [bench(int(n), args.heads, args.dim, dtype, device, cuda, args.sparsity) for n in args.n.split(",")]
    with open(args.out, "w") as f:
        json.dump({"env": env, "results": rows}, f, indent=1)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
