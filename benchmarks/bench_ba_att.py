"""BA-Att as a whole operator (sort + estimate + select + kernel) against dense SDPA (flash, cuDNN) and
FlexAttention running the same selected blocks, for each of ``--configs`` (default: the library's default
BA-Att and the paper's setting).

    python benchmarks/bench_ba_att.py --out bench_ba_att.json            # H100: N 16k/32k/64k, H 16, D 128
    python benchmarks/bench_ba_att.py --quick --out /tmp/bench.json      # CPU smoke run, tiny sizes

Timings are medians of ``triton.testing.do_bench`` on CUDA (a perf_counter loop on CPU). Inputs are
random normal and, with ``--inputs random,video``, the structured video generator (never zeros).
Also reported: the selection overhead alone (sort + stats + scores + select) as a share of dense
cuDNN time. FlexAttention gets a ``BlockMask`` built from our (block_index, block_count) with every
kept block marked full, i.e. its best case, and is timed without the selection.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import time

import torch

from sparsediff.eval.fidelity import make_probe
from sparsediff.methods import make_method
from sparsediff.methods.dense import dense_attention


def timer(fn, cuda: bool) -> float:
    """Median milliseconds of ``fn()``."""
    if cuda:
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
    fn()
    times = []
    for _ in range(5):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def sdpa_peers(q, k, v, cuda: bool) -> dict:
    """Dense peers that exist on this device: name -> zero-arg callable."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    backends = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION} if cuda else {
        "sdpa_math": SDPBackend.MATH}
    peers = {}
    for name, backend in backends.items():
        def run(backend=backend):
            with sdpa_kernel(backend):
                return sdpa(q, k, v)
        try:
            run()
            peers[name] = run
        except RuntimeError as err:
            print(f"  {name}: unavailable ({str(err).splitlines()[0][:80]})")
    return peers


def flex_from_plan(plan, q, compile_flex: bool, block_size: int = 128):
    """FlexAttention over the kept blocks of ``plan`` (keys as the plan sees them)."""
    from torch.nn.attention.flex_attention import BlockMask, flex_attention

    index, count = plan.block_index, plan.block_count
    b, h, nqb, _ = index.shape
    nkb = -(-plan.k.shape[2] // block_size)
    full_index = torch.zeros(b, h, nqb, nkb, dtype=torch.int32, device=index.device)
    full_index[..., : index.shape[-1]] = index
    # Every kept block is whole (non-causal, N a multiple of the block): flex's mask-free fast path.
    block_mask = BlockMask.from_kv_blocks(
        torch.zeros_like(count), full_index, full_kv_num_blocks=count, full_kv_indices=full_index,
        BLOCK_SIZE=block_size,
    )
    fn = torch.compile(flex_attention) if compile_flex else flex_attention
    return lambda: fn(q, plan.k, plan.v, block_mask=block_mask)


def bench_case(q, k, v, sparsities, cuda, compile_flex, label, frame_size=None, configs=("ba_att",)) -> dict:
    peers = sdpa_peers(q, k, v, cuda)
    dense_ms = {name: timer(fn, cuda) for name, fn in peers.items()}
    ref = dense_attention(q.float(), k.float(), v.float())
    for name, ms in dense_ms.items():
        print(f"  [{label}] dense {name:9s} {ms:9.3f} ms")
    base = dense_ms.get("cudnn") or next(iter(dense_ms.values()))
    rows = []
    for sparsity, config in ((s, c) for s in sparsities for c in configs):
        method = make_method(config, sparsity=sparsity, min_seq_len=0)
        select_ms = timer(lambda: method.plan(q, k, v, frame_size=frame_size), cuda)
        op_ms = timer(lambda: method(q, k, v, frame_size=frame_size), cuda)
        method.reset()
        out = method(q, k, v, frame_size=frame_size).float()
        rel_l2 = float((out - ref).norm() / ref.norm())
        row = {"input": label, "config": config, "sparsity": sparsity, "ba_att_ms": op_ms, "selection_ms": select_ms,
               "selection_pct_of_dense": 100 * select_ms / base, "rel_l2_vs_dense": rel_l2,
               "realised_density": method.realised_density(),
               "speedup": {name: ms / op_ms for name, ms in dense_ms.items()}}
        try:
            plan = method.plan(q, k, v, frame_size=frame_size)
            flex_ms = timer(flex_from_plan(plan, q, compile_flex, plan.block_size), cuda)
            row["flex_kernel_ms"] = flex_ms
            row["speedup"]["flex_kernel_only"] = flex_ms / op_ms
        except Exception as err:  # noqa: BLE001 - report and go on: flex support varies by version/device
            print(f"  flex: unavailable ({type(err).__name__}: {str(err).splitlines()[0][:80]})")
        ratios = "  ".join(f"x{r:5.2f} vs {n}" for n, r in row["speedup"].items())
        print(f"  [{label}] sparsity {sparsity:.2f} {config}: {op_ms:8.3f} ms (selection {select_ms:.3f} ms = "
              f"{row['selection_pct_of_dense']:.1f}% of dense)  {ratios}  rel_l2 {rel_l2:.3f} "
              f"density {row['realised_density']:.3f}")
        rows.append(row)
    return {"dense_ms": dense_ms, "rows": rows}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", default="16384,32768,65536")
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--sparsity", default="0.5,0.8,0.9")
    parser.add_argument("--inputs", default="random,video", help="random and/or a fidelity generator name")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, CPU-friendly")
    parser.add_argument("--no-compile", action="store_true", help="run FlexAttention eagerly")
    parser.add_argument("--configs", default="ba_att,ba_att_paper",
                        help="comma-separated BA-Att specs to time (e.g. ba_att/block_size=64, ba_att/compensate=true)")
    parser.add_argument("--out", default="bench_ba_att.json")
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    if args.quick:
        args.n, args.heads, args.dim = "1024", 2, 64
        if not cuda:
            args.dtype = "float32"  # CPU SDPA and the PyTorch path
    dtype = getattr(torch, args.dtype)
    import triton

    env = {"device": torch.cuda.get_device_name() if cuda else platform.processor() or "cpu",
           "torch": torch.__version__, "triton": triton.__version__,
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "heads": args.heads, "dim": args.dim, "dtype": args.dtype, "batch": 1}
    print(f"{env['device']}  torch {env['torch']}  triton {env['triton']}  {env['date']}")
    sparsities = [float(x) for x in args.sparsity.split(",")]
    results = []
    for n in (int(x) for x in args.n.split(",")):
        for label in args.inputs.split(","):
            print(f"N={n} H={args.heads} D={args.dim} {args.dtype} input={label}")
            torch.manual_seed(0)
            frame_size = None
            if label == "random":
                q, k, v = (torch.randn(1, args.heads, n, args.dim, device=device, dtype=dtype) for _ in range(3))
            else:
                p = make_probe(label, heads=args.heads, n=n, dim=args.dim, dtype=dtype)
                q, k, v, frame_size = p.q.to(device), p.k.to(device), p.v.to(device), p.frame_size
            case = bench_case(q, k, v, sparsities, cuda, compile_flex=cuda and not args.no_compile, label=label,
                              frame_size=frame_size, configs=[c for c in args.configs.split(",") if c])
            results.append({"n": n, **case})
            del q, k, v
            if cuda:
                torch.cuda.empty_cache()
    with open(args.out, "w") as f:
        json.dump({"env": env, "results": results}, f, indent=1)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
