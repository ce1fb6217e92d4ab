"""LoSA's union score at one cached step's shape, by backend, and the split prefix attention with and without
the copy of q per split (``repeat_q``).

    python benchmarks/bench_losa_score.py [--prefix 65536] [--block 128] [--live 0.26] [--out s.json]

GQA 32/8, D=128, bf16: ``group * block`` stacked rows per KV head, the leading ``live`` share of them live.
Times are ``triton.testing.do_bench`` medians (ms); the ranked ids of each backend are compared with the
float32 PyTorch path's.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sparsediff.kernels import block_sparse_attention  # noqa: E402
from sparsediff.methods.losa.step_kernels import mean_key_score, rank_blocks, split_means  # noqa: E402
from sparsediff.methods.losa.step_triton import live_mass_triton  # noqa: E402
from sparsediff.runtime.split_kv import choose_splits  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prefix", type=int, default=65536)
    p.add_argument("--block", type=int, default=128)
    p.add_argument("--live", type=float, default=0.26)
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args()
    dev, bs, hq, hkv, d = "cuda", 128, 32, 8, 128
    group = hq // hkv
    nkb = a.prefix // bs
    r = -(-a.block * group // bs) * bs
    gen = torch.Generator(device=dev).manual_seed(0)
    rows = torch.randn(1, hkv, r, d, device=dev, generator=gen).to(torch.bfloat16)
    k = torch.randn(1, hkv, a.prefix + a.block, d, device=dev, generator=gen).to(torch.bfloat16)
    k[:, :, 7 * bs: 9 * bs] += rows[:, :, :8].float().mean(dim=2, keepdim=True).to(k.dtype)  # hot blocks
    means = k[:, :, : nkb * bs].float().view(1, hkv, nkb, bs, d).mean(dim=3) * d ** -0.5
    bias = torch.zeros(nkb, device=dev)
    n_live = torch.tensor([int(a.live * a.block) * group], device=dev, dtype=torch.int32)
    keep = round(nkb * 0.2)
    split = split_means(means)
    want = mean_key_score(rows, n_live, means, bias, backend="torch")
    fns = {"torch": lambda: mean_key_score(rows, n_live, means, bias, backend="torch"),
           "triton_split_bf16": lambda: mean_key_score(rows, n_live, means, bias, split=split, backend="triton")}
    for bm in (8, 16, 32):
        fns[f"logits_m{bm}"] = (lambda bm=bm: live_mass_triton(torch.matmul(rows.float(), means.transpose(-1, -2)),
                                                                 n_live, bias, block_m=bm))
    fns["matmul_only"] = lambda: torch.matmul(rows.float(), means.transpose(-1, -2))
    res = {"args": vars(a) | {"out": str(a.out)}, "device": torch.cuda.get_device_name(), "score_ms": {},
           "same_ids": {}}
    for name, fn in fns.items():
        res["score_ms"][name] = triton.testing.do_bench(fn, warmup=50, rep=300, return_mode="median")
        if name != "matmul_only":
            res["same_ids"][name] = torch.equal(rank_blocks(fn(), keep), rank_blocks(want, keep))
    # Split prefix attention over the kept blocks: the q copy per split vs repeat_q.
    splits = choose_splits(rows.new_empty(1, hq, a.block, d), keep, heads=hq)
    chunk = -(-keep // splits)
    nqb = r // bs
    index = torch.randint(0, nkb, (1, hkv, splits * nqb, chunk), device=dev, generator=gen, dtype=torch.int32)
    live_tiles = -(-int(n_live) // bs)
    count = torch.zeros(1, hkv, splits, nqb, dtype=torch.int32, device=dev)
    count[..., :live_tiles] = chunk
    count = count.view(1, hkv, splits * nqb)
    kw = dict(block_size=bs, return_lse=True, check_ids=False)
    attn = {"repeat_copy": lambda: block_sparse_attention(rows.repeat(1, 1, splits, 1), k, v, index, count, **kw),
            "repeat_q": lambda: block_sparse_attention(rows, k, v, index, count, repeat_q=splits, **kw)}
    v = torch.randn_like(k)
    res["splits"] = splits
    res["attn_ms"] = {n: triton.testing.do_bench(f, warmup=50, rep=300, return_mode="median") for n, f in attn.items()}
    o1, o2 = attn["repeat_copy"](), attn["repeat_q"]()
    res["attn_equal"] = bool(torch.equal(o1[0], o2[0]) and torch.equal(o1[1], o2[1]))
    print(json.dumps(res, indent=1))
    if a.out:
        a.out.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
