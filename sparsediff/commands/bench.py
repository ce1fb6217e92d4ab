"""``sparsediff bench``: block-sparse attention vs dense attention on this machine.

On a GPU: Triton kernel vs SDPA (flash and cuDNN backends) and, with ``--flex``, FlexAttention on the
same block mask, at N = 8k..64k, H = 16, D = 128, bf16. On CPU: the PyTorch path vs dense SDPA at
small sizes. Inputs are random normal (never zeros); times are medians.
"""

from __future__ import annotations

import datetime
import json
import math
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from ..kernels import block_sparse_attention, mask_to_index
from .args import densities, precisions


def random_block_mask(b, h, nqb, nkb, density, device, generator=None):
    """Per-head random mask keeping exactly round(density * nkb) key blocks (>= 1) per query block."""
    keep = max(1, round(density * nkb))
    scores = torch.rand(b, h, nqb, nkb, device=device, generator=generator)
    idx = scores.topk(keep, dim=-1).indices
    mask = torch.zeros(b, h, nqb, nkb, dtype=torch.bool, device=device)
    return mask.scatter_(-1, idx, True)


def time_ms(fn, device: str, *, warmup: int = 2, rep: int = 5) -> float:
    """Median milliseconds of ``fn()``: device events through ``triton.testing.do_bench`` on CUDA."""
    if device == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(rep):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def sdpa_fn(q, k, v, backend_name: str | None):
    if backend_name in (None, "sdpa"):  # "sdpa" (the CPU peer's name): PyTorch's own choice on any device
        return lambda: F.scaled_dot_product_attention(q, k, v)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}[backend_name]

    def run():
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v)

    return run


def sage_fn(q, k, v):
    """Dense SageAttention (``sageattention`` 1.x: INT8 Q·Kᵀ, fp16 P·V), the 8-bit peer; ImportError if absent.

    It smooths the keys in place (``k -= k.mean``), so it gets its own copy of ``k``.
    """
    from sageattention import sageattn

    k_own = k.clone()
    return lambda: sageattn(q, k_own, v, tensor_layout="HND", is_causal=False)


def dense_fn(q, k, v, peer: str | None):
    """One dense peer by name: an SDPA backend ("flash", "cudnn"; None or "sdpa" = PyTorch's choice) or "sage"."""
    return sage_fn(q, k, v) if peer == "sage" else sdpa_fn(q, k, v, peer)


def peer_key(peer: str) -> str:
    """The row key of a dense peer's time: sdpa_flash_ms, sdpa_cudnn_ms, sage_ms."""
    return "sage_ms" if peer == "sage" else f"sdpa_{peer}_ms"


def flex_fn(q, k, v, index, count, block_size):
    """FlexAttention on the same kept blocks, all marked full (no mask_mod): its best case."""
    from torch.nn.attention.flex_attention import BlockMask, flex_attention

    b, h, nqb, kept = index.shape
    nkb = math.ceil(k.shape[2] / block_size)
    kv_indices = torch.zeros(b, h, nqb, nkb, dtype=torch.int32, device=q.device)
    kv_indices[..., :kept] = index
    block_mask = BlockMask.from_kv_blocks(
        torch.zeros_like(count), kv_indices.clone(), count, kv_indices, BLOCK_SIZE=block_size,
        seq_lengths=(q.shape[2], k.shape[2]),
    )
    compiled = _compiled_flex(flex_attention)
    return lambda: compiled(q, k, v, block_mask=block_mask)


_FLEX = None


def _compiled_flex(flex_attention):
    global _FLEX
    if _FLEX is None:
        _FLEX = torch.compile(flex_attention, dynamic=False)
    return _FLEX


def time_rounds(fns: dict, device: str, rounds: int = 1) -> dict[str, list[float]]:
    """Each named callable timed ``rounds`` times, in turn (so drifting clocks hit all of them alike)."""
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            times[name].append(time_ms(fn, device))
    return times


def run_grid(sizes, densities, *, heads, dim, dtype, device, block_size=128, peers=("flash", "cudnn"),
             flex=False, extra_dims=(), precisions=("bf16",), rounds=1, log=print):
    """Time every (N, density) pair; returns a list of row dicts.

    ``peers`` are dense baselines (SDPA backends, "sage"), timed again right before our kernel at every density
    so that each ratio is taken under the same clocks (one timing per N let a 64k ratio drift by 15 % with the
    GPU's state); ``precisions`` beyond "bf16" add the 8-bit kernel on the same blocks (``ours_int8_ms``,
    ``int8_x_bf16``, ``int8_speedup_vs_<peer>``). ``rounds`` > 1 times every kernel of a cell that many times in
    turn and keeps each one's median (single cells scattered +-7 % between identical runs); the per-round
    ratios against cuDNN are kept as ``speedup_vs_cudnn_rounds``.
    """
    rows = []
    gen = torch.Generator(device=device).manual_seed(0)
    for n, d in [(n, dim) for n in sizes] + list(extra_dims):
        q, k, v = (torch.randn(1, heads, n, d, device=device, dtype=dtype, generator=gen) for _ in range(3))
        nb = math.ceil(n / block_size)
        available = list(peers)
        for density in densities:
            fns = {}
            for peer in list(available):
                try:
                    fn = dense_fn(q, k, v, peer if device == "cuda" or peer == "sage" else None)
                    fn()  # a backend the build or machine lacks raises here
                    fns[peer] = fn
                except (RuntimeError, ImportError, AssertionError) as err:  # a backend the build or machine lacks
                    log(f"  skipping dense {peer} at N={n}: {type(err).__name__}: {err}")
                    available.remove(peer)
            mask = random_block_mask(1, heads, nb, nb, density, device, generator=gen)
            index, count = mask_to_index(mask)
            real_density = count.sum().item() / (heads * nb * nb)
            for precision in ("bf16", *[p for p in precisions if p != "bf16"]):
                fns[f"ours_{precision}"] = (
                    lambda p=precision, q=q, k=k, v=v, index=index, count=count: block_sparse_attention(
                        q, k, v, index, count, block_size=block_size, precision=p, check_ids=False))
            if flex:
                fns["flex"] = flex_fn(q, k, v, index, count, block_size)
            times = time_rounds(fns, device, rounds)
            med = {name: statistics.median(ts) for name, ts in times.items()}
            ours = med["ours_bf16"]
            flops = 4 * n * n * d * heads * real_density
            row = {"N": n, "D": d, "H": heads, "density": round(real_density, 4), "ours_ms": ours,
                   "ours_tflops": flops / ours / 1e9}
            if rounds > 1:
                row["rounds"] = rounds
            for peer in [p for p in peers if p in fns]:
                t = med[peer]
                row[peer_key(peer)] = t
                row[f"speedup_vs_{peer}"] = t / ours
                row[f"time_over_density_x_{peer}"] = ours / (real_density * t)
            if rounds > 1 and "cudnn" in fns:
                row["speedup_vs_cudnn_rounds"] = [c / o for c, o in zip(times["cudnn"], times["ours_bf16"])]
            for precision in [p for p in precisions if p != "bf16"]:
                t = med[f"ours_{precision}"]
                row[f"ours_{precision}_ms"], row[f"{precision}_x_bf16"] = t, ours / t
                for peer in [p for p in peers if p in fns]:
                    row[f"{precision}_speedup_vs_{peer}"] = med[peer] / t
            if flex:
                t = med["flex"]
                row["flex_ms"], row["flex_tflops"], row["speedup_vs_flex"] = t, flops / t / 1e9, t / ours
                for precision in [p for p in precisions if p != "bf16"]:  # the sparse peer, same mask
                    row[f"{precision}_speedup_vs_flex"] = t / row[f"ours_{precision}_ms"]
            rows.append(row)
            log("  " + ", ".join(f"{key}={val:.3g}" if isinstance(val, float) else f"{key}={val}"
                                 for key, val in row.items() if not isinstance(val, list)))
    return rows


def _ratio(x) -> str:
    return "-" if x is None else f"{x:.2f}"


def format_table(rows) -> str:
    # (per-round lists such as speedup_vs_cudnn_rounds stay in the JSON)
    peers = [c[len("speedup_vs_"):] for c, v in rows[0].items() if c.startswith("speedup_vs_")
             and not isinstance(v, list)] if rows else []
    precisions = [c[:-len("_x_bf16")] for c in rows[0] if c.endswith("_x_bf16")] if rows else []
    head = ["N", "D", "density", "ours ms", "ours TF/s"] + [f"x vs {p}" for p in peers]
    head += [f"{p} x bf16" for p in precisions] + [f"{p} x vs {q}" for p in precisions for q in peers]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [str(r["N"]), str(r["D"]), f"{r['density']:.2f}", f"{r['ours_ms']:.3f}", f"{r['ours_tflops']:.3g}"]
        cells += [f"{r['speedup_vs_' + p]:.2f}" for p in peers]
        cells += [f"{r[p + '_x_bf16']:.2f}" for p in precisions]
        # "-" where a row lacks a ratio (older JSON: 8-bit rows had no ratio against Flex).
        cells += [_ratio(r.get(f"{p}_speedup_vs_{q}")) for p in precisions for q in peers]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def installed_peers(cuda: bool) -> tuple[str, ...]:
    """The dense peers this machine can run: SDPA flash and cuDNN on a GPU, plus SageAttention if installed."""
    import importlib.util

    if not cuda:
        return ("sdpa",)
    return ("flash", "cudnn") + (("sage",) if importlib.util.find_spec("sageattention") else ())


def environment() -> dict:
    info = {"date": datetime.date.today().isoformat(), "torch": torch.__version__, "python": platform.python_version()}
    if torch.cuda.is_available():
        info["device"] = torch.cuda.get_device_name()
    else:
        info["device"] = f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        pass
    if torch.cuda.is_available():
        from ..kernels.block_sparse import gluon_enabled
        from ..kernels.pdl import pdl_enabled

        # Which block-sparse kernel the default backend picks for block 128, D 64/128 on this GPU.
        sm90 = torch.cuda.get_device_capability() == (9, 0)
        info["block_sparse_kernel"] = "gluon" if sm90 and gluon_enabled() else "triton"
        info["pdl"] = pdl_enabled(torch.empty(0, device="cuda"))  # SPARSEDIFF_PDL=1 on sm_90+
    return info


def add_arguments(parser) -> None:
    parser.add_argument("--sizes", default=None, help="comma-separated sequence lengths (default by device)")
    parser.add_argument("--densities", type=densities, default="1.0,0.5,0.25,0.1",
                        help="comma-separated shares of key blocks kept, each in (0, 1]")
    parser.add_argument("--heads", type=int, default=None)
    parser.add_argument("--dim", type=int, default=None)
    parser.add_argument("--flex", action="store_true", help="also time FlexAttention (GPU; compiles first)")
    parser.add_argument("--precisions", type=precisions, default="bf16",
                        help="comma-separated kernel precisions to time: bf16, int8, int8_fp8 (8-bit: a CUDA GPU or "
                             "the Triton interpreter; on Hopper the Gluon 8-bit kernel unless SPARSEDIFF_GLUON_INT8=0)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="time each cell's kernels this many times in turn and keep the medians")
    parser.add_argument("--out", default=None, help="write the rows as JSON here")


def run(args) -> int:
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    default_sizes = [8192, 16384, 32768, 65536] if cuda else [2048, 4096]
    sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else default_sizes
    heads = args.heads or (16 if cuda else 4)
    dim = args.dim or (128 if cuda else 64)
    dtype = torch.bfloat16 if cuda else torch.float32
    eight_bit = [p for p in args.precisions if p != "bf16"]
    if eight_bit and not cuda:
        from ..kernels.backend import interpreted

        if not interpreted():
            print(f"sparsediff bench: --precisions {','.join(eight_bit)} runs the Triton 8-bit kernel: it needs a CUDA "
                  "GPU, or TRITON_INTERPRET=1 on CPU (slow; small --sizes)", file=sys.stderr)
            return 2
    env = environment()
    print(f"sparsediff bench on {env['device']} (torch {env['torch']}), H={heads}, D={dim}, {dtype}")
    rows = run_grid(sizes, args.densities, heads=heads, dim=dim, dtype=dtype, device=device,
                    peers=installed_peers(cuda), flex=args.flex and cuda, precisions=args.precisions,
                    rounds=args.rounds)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"environment": env, "rows": rows}, f, indent=1)
    print(format_table(rows))
    return 0
