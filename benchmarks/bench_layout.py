"""Cost of the tiled token layout (permute q, k, v; unpermute the output) against one dense cuDNN attention call
at Wan2.1 latent sizes (12 heads, D 128, bf16, random normal inputs).

    python benchmarks/bench_layout.py --out bench_layout.json     # GPU only
"""

from __future__ import annotations

import argparse
import json

import torch


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grids", default="21x30x52,21x60x104", help="latent grids FxHxW, comma-separated")
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--out", default="bench_layout.json")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU")
    import triton.testing
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from sparsediff.methods.token_layout import make_layout

    rows = []
    for text in args.grids.split(","):
        grid = tuple(int(x) for x in text.split("x"))
        n = grid[0] * grid[1] * grid[2]
        q, k, v = (torch.randn(1, args.heads, n, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        tiles = make_layout(grid, 128, device="cuda")

        def layout_only():
            qs, _, _ = tiles.permute(q), tiles.permute(k), tiles.permute(v)
            return tiles.unpermute(qs)

        def dense():
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                return torch.nn.functional.scaled_dot_product_attention(q, k, v)

        layout_ms = triton.testing.do_bench(layout_only, warmup=10, rep=50, return_mode="median")
        dense_ms = triton.testing.do_bench(dense, warmup=5, rep=20, return_mode="median")
        rows.append(dict(grid=grid, heads=args.heads, n=n, layout_ms=layout_ms, cudnn_dense_ms=dense_ms,
                         share=layout_ms / dense_ms))
        print(f"grid {grid} N {n}: layout {layout_ms:.3f} ms, cuDNN dense {dense_ms:.3f} ms, "
              f"{100 * layout_ms / dense_ms:.2f} %")
    with open(args.out, "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
