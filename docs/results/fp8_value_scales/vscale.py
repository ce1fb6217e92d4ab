import math
import sys

import torch
from sparsediff.kernels.block_sparse.quantize import quantize_tiles
FP8 = torch.float8_e4m3fn
def e4(x): return x.to(FP8).double()
def attn(q, k, v, causal):
    s = q.double() @ k.double().transpose(-1, -2) / math.sqrt(q.shape[-1])
    if causal:
        n = s.shape[-1]; s = s.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    m = s.amax(-1, keepdim=True); p = torch.exp(s - m); l = p.sum(-1, keepdim=True)
    return p, l
def run(q, k, v, causal, label):
    g = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(g, 1); v = v.repeat_interleave(g, 1)
    p, l = attn(q, k, v, causal)
    ref = (p @ v.double()) / l
    p8 = e4(p * 448) / 448
    res = {}
    v8, sc = quantize_tiles(v.float(), 128)  # per tile of 128 keys
    n = v.shape[2]; tiles = sc.repeat_interleave(128, -1)[..., :n]
    res["tile"] = (p8 @ (v8.double() * tiles[..., None].double())) / l
    sc_tok = v.double().abs().amax(-1, keepdim=True).clamp_min(1e-30) / 448
    res["token"] = (p8 @ (e4(v.double() / sc_tok) * sc_tok)) / l
    sc_ch = v.double().abs().amax(-2, keepdim=True).clamp_min(1e-30) / 448
    res["channel"] = (p8 @ (e4(v.double() / sc_ch) * sc_ch)) / l
    res["P only (v exact)"] = (p8 @ v.double()) / l
    print(label, "  ".join(f"{k} {float((o - ref).norm() / ref.norm()):.4f}" for k, o in res.items()), flush=True)
torch.manual_seed(0)
for causal in (False, True):
    run(torch.randn(1,4,512,64), torch.randn(1,2,512,64)+2, torch.randn(1,2,512,64), causal, f"random causal={causal}")
d = torch.load(sys.argv[1])
for layer, (q, k, v) in d.items():
    run(q[:, :, :1024], k[:, :, :1024], v[:, :, :1024], True, f"SmolLM2 layer {layer}")
