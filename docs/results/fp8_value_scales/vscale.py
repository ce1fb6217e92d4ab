"""FP8 P·V error of dense attention with V scaled per tile, per token or per channel (float64 emulation).

    python docs/results/fp8_value_scales/vscale.py QKV.pt    # QKV.pt: {layer: (q, k, v)}, (B, H, N, D) each
"""

import math
import sys

import torch

from sparsediff.kernels.block_sparse.quantize import quantize_tiles

FP8 = torch.float8_e4m3fn


def e4m3(x):
    return x.to(FP8).double()


def probabilities(q, k, causal):
    """Unnormalised probabilities (relative to each row's max) and their row sums."""
    s = q.double() @ k.double().transpose(-1, -2) / math.sqrt(q.shape[-1])
    if causal:
        n = s.shape[-1]
        s = s.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    p = torch.exp(s - s.amax(-1, keepdim=True))
    return p, p.sum(-1, keepdim=True)


def errors(q, k, v, causal):
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1).double()
    p, row_sum = probabilities(q, k, causal)
    ref = p @ v / row_sum
    p8 = e4m3(p * 448) / 448
    v8, tile_scale = quantize_tiles(v.float(), 128)
    per_key = tile_scale.repeat_interleave(128, -1)[..., : v.shape[2], None].double()
    token_scale = v.abs().amax(-1, keepdim=True).clamp_min(1e-30) / 448
    channel_scale = v.abs().amax(-2, keepdim=True).clamp_min(1e-30) / 448
    outs = {
        "tile": p8 @ (v8.double() * per_key),
        "token": p8 @ (e4m3(v / token_scale) * token_scale),
        "channel": p8 @ (e4m3(v / channel_scale) * channel_scale),
        "P only (v exact)": p8 @ v,
    }
    return {name: float((out / row_sum - ref).norm() / ref.norm()) for name, out in outs.items()}


def main():
    torch.manual_seed(0)
    cases = [(f"random causal={c}", (torch.randn(1, 4, 512, 64), torch.randn(1, 2, 512, 64) + 2,
                                      torch.randn(1, 2, 512, 64)), c) for c in (False, True)]
    for layer, (q, k, v) in torch.load(sys.argv[1]).items():
        cases.append((f"SmolLM2 layer {layer}", (q[:, :, :1024], k[:, :, :1024], v[:, :, :1024]), True))
    for label, (q, k, v), causal in cases:
        print(label, "  ".join(f"{name} {err:.4f}" for name, err in errors(q, k, v, causal).items()), flush=True)


if __name__ == "__main__":
    main()
