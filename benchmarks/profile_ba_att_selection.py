"""Per-stage GPU timings of BA-Att selection (norms, sort, stats, scores, select): where the overhead goes.

    python benchmarks/profile_ba_att_selection.py
"""
import torch
import triton.testing as tt

from sparsediff.kernels import block_stats
from sparsediff.methods.ba_att import BAAttConfig, BAAttMethod, ba_scores, select_blocks, sort_keys
from sparsediff.methods.block_select import select_from_scores

for n in (32768, 65536):
    q, k, v = (torch.randn(1, 16, n, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    cfg = BAAttConfig(sparsity=0.5, min_seq_len=0)
    m = BAAttMethod(cfg)
    sc = ba_scores(q, k)
    parts = {
        "norms": lambda: torch.linalg.vector_norm(k, dim=-1, dtype=torch.float32),
        "argsort": lambda: torch.linalg.vector_norm(k, dim=-1, dtype=torch.float32).argsort(dim=-1, descending=True),
        "sort_keys": lambda: sort_keys(k, v),
        "stats_q": lambda: block_stats(q, 128),
        "ba_scores": lambda: ba_scores(q, k),
        "select_from_scores": lambda: select_from_scores(sc, nq=n, nk=n, block_size=128, density=0.5),
        "select_blocks": lambda: select_blocks(q, k, cfg),
        "plan": lambda: m.plan(q, k, v),
    }
    for name, fn in parts.items():
        print(n, name, round(tt.do_bench(fn, warmup=25, rep=100, return_mode="median"), 4), "ms")
