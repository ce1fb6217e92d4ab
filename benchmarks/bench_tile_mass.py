"""Tile-mass kernel (SparseD's pass 2) on a GPU: agreement with the chunked PyTorch path, and time
next to pass 1 (dense attention with LSE) and cuDNN SDPA.

    python benchmarks/bench_tile_mass.py --out bench_tile_mass.json
    python benchmarks/bench_tile_mass.py --quick                      # CPU smoke run

B=1, H=32, D=128, bf16, block 128, random normal inputs; times are do_bench medians.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sparsediff.commands.bench import environment, sdpa_fn, time_ms  # noqa: E402
from sparsediff.kernels.tile_mass import row_lse, tile_mass  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--sizes", default="4096,16384,65536")
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() and not args.quick else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    sizes = [512] if args.quick else [int(s) for s in args.sizes.split(",")]
    heads = 2 if args.quick else args.heads
    env = environment()
    print(f"device: {env['device']}; torch {env['torch']}; triton {env.get('triton')}; {dtype}")
    rows = []
    for n in sizes:
        gen = torch.Generator(device=device).manual_seed(n)
        q, k, v = (torch.randn(1, heads, n, 128, device=device, dtype=dtype, generator=gen) for _ in range(3))
        _, lse = row_lse(q, k, v)
        fast = tile_mass(q, k, lse)
        row = {"N": n, "heads": heads}
        if n <= 16384:  # the chunked PyTorch path as the reference (float32 accumulation)
            slow = tile_mass(q, k, lse, backend="torch")
            row["max_rel_err_vs_torch"] = float((fast - slow).abs().max() / slow.abs().max())
        row["tile_mass_ms"] = time_ms(lambda q=q, k=k, lse=lse: tile_mass(q, k, lse), device)
        row["row_lse_ms"] = time_ms(lambda q=q, k=k, v=v: row_lse(q, k, v), device)
        row["sdpa_ms"] = time_ms(sdpa_fn(q, k, v, "cudnn" if device == "cuda" else None), device)
        rows.append(row)
        print(json.dumps(row))
    if args.out:
        args.out.write_text(json.dumps({"environment": env, "rows": rows}, indent=2))
    print("| N | tile mass ms | pass 1 (dense+LSE) ms | cuDNN SDPA ms | rel err vs torch |")
    print("|---|---|---|---|---|")
    for r in rows:
        err = r.get("max_rel_err_vs_torch")
        print(f"| {r['N']} | {r['tile_mass_ms']:.2f} | {r['row_lse_ms']:.2f} | {r['sdpa_ms']:.2f} | "
              f"{'n/a' if err is None else f'{err:.1e}'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
