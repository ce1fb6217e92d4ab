"""The 8-bit block-sparse kernel against the 16-bit one and dense cuDNN, same inputs, same block index.

    python benchmarks/bench_eight_bit.py --out bench_eight_bit.json      # GPU: N 16k/32k/64k, density 1/0.5/0.2
    python benchmarks/bench_eight_bit.py --quick --out /tmp/e8.json     # CPU smoke run (interpreter, tiny)

B=1, H=16, D=128, bf16 random normal inputs (keys with a shared offset, as real keys have), random block masks
at each density (diagonal kept). Rows: cuDNN dense SDPA, the 16-bit kernel (``precision="bf16"``, Gluon on
Hopper), ``"int8"`` and ``"int8_fp8"`` (the default dispatch, the portable Triton kernel, and on Hopper the
Gluon one, also with per-token key scales as before), whole calls with quantization, and the INT8
quantization of q and k alone (one Triton pass each, and the same in PyTorch ops), with the output's relative
L2 error against float32 attention on the same blocks (up to 16k).
Dense SageAttention (the 8-bit peer, its key smoothing and quantization included) when ``sageattention``
is installed: ``x_sage`` is its time over ours.
Medians of ``triton.testing.do_bench``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import platform
import sys

if "--quick" in sys.argv:  # the CPU smoke run takes the Triton interpreter, set before triton is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

from sparsediff.commands.bench import sage_fn, time_ms  # noqa: E402
from sparsediff.kernels import block_sparse_attention, mask_to_index  # noqa: E402
from sparsediff.kernels.block_sparse.quantize import quantize_qk, quantize_tiles  # noqa: E402


def timer(fn, cuda: bool) -> float:
    # One warm-up and two timed calls on CPU: the interpreter takes seconds per 8-bit call.
    return time_ms(fn, "cuda" if cuda else "cpu", warmup=1, rep=2)


@contextlib.contextmanager
def gluon_schedule(**options):
    """The Gluon kernel's default schedule with ``options`` changed for the duration (A/B rows of one run)."""
    if not options:
        yield
        return
    from sparsediff.kernels.block_sparse import gluon

    saved = dict(gluon.DEFAULT_SCHEDULE)
    gluon.DEFAULT_SCHEDULE.update(options)
    try:
        yield
    finally:
        gluon.DEFAULT_SCHEDULE.clear()
        gluon.DEFAULT_SCHEDULE.update(saved)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", default="16384,32768,65536")
    parser.add_argument("--densities", default="1.0,0.5,0.2")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default="bench_eight_bit.json")
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available() and not args.quick
    device = "cuda" if cuda else "cpu"
    heads, dim, bs = (16, 128, 128) if cuda else (2, 32, 32)
    sizes = [int(x) for x in args.n.split(",")] if cuda else [256]
    rows = []
    for n in sizes:
        torch.manual_seed(0)
        q = torch.randn(1, heads, n, dim, device=device, dtype=torch.bfloat16)
        k = torch.randn(1, heads, n, dim, device=device, dtype=torch.bfloat16) + 1.0
        v = torch.randn(1, heads, n, dim, device=device, dtype=torch.bfloat16)
        if cuda:
            from torch.nn.attention import SDPBackend, sdpa_kernel

            def dense():
                with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                    return torch.nn.functional.scaled_dot_product_attention(q, k, v)
            dense_ms = timer(dense, cuda)
            try:
                sage_ms = timer(sage_fn(q, k, v), cuda)
            except ImportError:
                sage_ms = None
        else:
            dense_ms = sage_ms = None  # no cuDNN or SageAttention on CPU
        nb = math.ceil(n / bs)
        for density in (float(x) for x in args.densities.split(",")):
            g = torch.Generator().manual_seed(1)  # the mask drawn on the CPU (the same on every device), then moved
            mask = (torch.rand(1, heads, nb, nb, generator=g, device="cpu") < density) | \
                torch.eye(nb, dtype=torch.bool, device="cpu")
            index, count = (t.to(device) for t in mask_to_index(mask))
            ref = block_sparse_attention(q.float(), k.float(), v.float(), index, count, block_size=bs,
                                         backend="torch") if n <= 16384 or not cuda else None
            row = {"n": n, "density": density, "cudnn_ms": dense_ms, "sage_ms": sage_ms, "kernels": {}}
            # "int8" / "int8_fp8": the default dispatch; the Triton and (on Hopper) Gluon kernels by name.
            hopper = cuda and torch.cuda.get_device_capability() == (9, 0)
            # The Gluon kernel also with per-token key scales (int8_tile_k=False), as it ran before 2026-12-07.
            gluon = [("int8 (Gluon kernel)", "int8", "gluon", {}),
                     ("int8 (Gluon kernel, per-token k)", "int8", "gluon", {"int8_tile_k": False}),
                     ("int8_fp8 (Gluon kernel)", "int8_fp8", "gluon", {}),
                     ("int8_fp8 (Gluon kernel, per-token k)", "int8_fp8", "gluon", {"int8_tile_k": False})] \
                if hopper else []
            for label, precision, backend, schedule in [("bf16", "bf16", None, {}), ("int8", "int8", None, {}),
                                                        ("int8 (Triton kernel)", "int8", "triton", {}), *gluon,
                                                        ("int8_fp8", "int8_fp8", None, {})]:
                def fn(p=precision, b=backend, schedule=schedule):
                    with gluon_schedule(**schedule):
                        return block_sparse_attention(q, k, v, index, count, block_size=bs, precision=p, backend=b,
                                                      check_ids=False)
                ms = timer(fn, cuda)
                err = None
                if ref is not None:
                    err = float((fn().float() - ref).norm() / ref.norm())
                row["kernels"][label] = {"ms": ms, "x_cudnn": dense_ms / ms if cuda else None,
                                             "x_sage": sage_ms / ms if sage_ms else None, "rel_l2": err}
            def quantize_fused():  # what the int8 call adds before its kernel: one pass over q and one over k
                return quantize_qk(q, k, True)

            def quantize_torch():  # the same in PyTorch ops (float32 copies)
                quantize_tiles(q, 1, torch.int8)
                return quantize_tiles(k.float() - k.float().mean(dim=2, keepdim=True), 1, torch.int8)
            row["kernels"]["int8 quantization alone"] = {"ms": timer(quantize_fused, cuda)}
            row["kernels"]["int8 quantization in PyTorch ops"] = {"ms": timer(quantize_torch, cuda)}
            rows.append(row)
            head = f"N={n:6d} density {density:.2f}  cuDNN {dense_ms or 0:8.3f} ms  Sage {sage_ms or 0:8.3f} ms  "
            print(head + "  ".join(
                f"{p} {r['ms']:.3f} ms" + (f" ({dense_ms / r['ms']:.2f}x)" if cuda else "")
                for p, r in row["kernels"].items()), flush=True)
    env = {"device": torch.cuda.get_device_name() if cuda else platform.processor() or "cpu",
           "torch": torch.__version__}
    with open(args.out, "w") as f:
        json.dump({"benchmark": "bench_eight_bit", "date": datetime.datetime.now().isoformat(timespec="seconds"),
                   "environment": env, "rows": rows}, f, indent=2, allow_nan=False)
    print(f"JSON: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
