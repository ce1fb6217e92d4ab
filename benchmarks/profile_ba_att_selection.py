"""Per-stage GPU timings of BA-Att selection (norms, sort, gather, stats, scores, select), the current path
against the previous one (element-wise gather, separate stats pass, torch selection ops).

    python benchmarks/profile_ba_att_selection.py [--n 32768,65536] [--segment 256] [--out profile.json]

B=1, H=16, D=128, bf16, sparsity 0.5; ``--segment`` is the sort segment (the video probe's frame is 256
tokens, Wan2.1's 1560; 0 sorts the whole sequence). Also checks that both paths pick the same blocks.
"""
import argparse
import json
import math

import torch
import triton.testing as tt

from sparsediff.kernels import block_stats
from sparsediff.kernels.permute_stats import gather_rows, gather_rows_with_stats, row_norms
from sparsediff.methods.ba_att import BAAttConfig, BAAttMethod, _scores_from_stats, ba_scores
from sparsediff.methods.block_select import select_from_scores


def legacy_sort_keys(k, v, seg):
    """The previous sort_keys: fp32 norms, pad, segment argsort, element-wise gather with an expanded index."""
    bsz, h, n, d = k.shape
    nseg = math.ceil(n / seg)
    norms = torch.linalg.vector_norm(k, dim=-1, dtype=torch.float32)
    norms = torch.nn.functional.pad(norms, (0, nseg * seg - n), value=-1.0)
    order = norms.view(bsz, h, nseg, seg).argsort(dim=-1, descending=True)
    perm = (order + torch.arange(nseg, device=k.device)[:, None] * seg).view(bsz, h, nseg * seg)[..., :n]
    index = perm[..., None].expand(bsz, h, n, d)
    return k.gather(2, index), v.gather(2, index), perm


def legacy_plan(q, k, v, seg, n):
    ks, vs, perm = legacy_sort_keys(k, v, seg)
    scores = ba_scores(q, ks)
    return ks, vs, select_from_scores(scores, nq=n, nk=n, block_size=128, density=0.5, backend="torch"), perm


def bench(fn):
    return round(float(tt.do_bench(fn, warmup=25, rep=100, return_mode="median")), 4)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", default="32768,65536")
    parser.add_argument("--segment", type=int, default=256)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "segment": args.segment}
    for n in (int(x) for x in args.n.split(",")):
        torch.manual_seed(0)
        q, k, v = (torch.randn(1, 16, n, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        seg = args.segment or n
        m = BAAttMethod(BAAttConfig(sparsity=0.5, min_seq_len=0, sort_segment=seg))
        norms = row_norms(k)
        order = norms.view(1, 16, -1, seg).argsort(dim=-1, descending=True) if n % seg == 0 else None
        perm = m.plan(q, k, v).perm
        sq, sk = block_stats(q, 128), block_stats(k, 128)
        sc = _scores_from_stats(sq, sk)
        parts = {
            "norms_vector_norm (old)": lambda: torch.linalg.vector_norm(k, dim=-1, dtype=torch.float32),
            "norms_triton": lambda: row_norms(k),
            "argsort_segments": (lambda: norms.view(1, 16, -1, seg).argsort(dim=-1, descending=True))
            if order is not None else None,
            "gather_elementwise (old)": lambda: (k.gather(2, perm[..., None].expand_as(k)),
                                                 v.gather(2, perm[..., None].expand_as(v))),
            "gather_index_select (torch path)": lambda: gather_rows(k, v, perm),
            "gather_fused_with_k_stats": lambda: gather_rows_with_stats(k, v, perm, 128),
            "gather_fused_no_stats": lambda: gather_rows_with_stats(k, v, perm, 128, with_stats=False),
            "sort_keys (old)": lambda: legacy_sort_keys(k, v, seg),
            "stats_q": lambda: block_stats(q, 128),
            "scores_from_stats": lambda: _scores_from_stats(sq, sk),
            "select_torch (old)": lambda: select_from_scores(sc, nq=n, nk=n, block_size=128, density=0.5,
                                                             backend="torch"),
            "select_triton": lambda: select_from_scores(sc, nq=n, nk=n, block_size=128, density=0.5),
            "plan (old)": lambda: legacy_plan(q, k, v, seg, n),
            "plan (new)": lambda: m.plan(q, k, v),
        }
        row = {name: bench(fn) for name, fn in parts.items() if fn is not None}
        for name, ms in row.items():
            print(n, f"{name:34s}", ms, "ms")
        # Same blocks from both paths (ties aside: compare kept masks and the sorted keys).
        new = m.plan(q, k, v)
        old_k, _, (old_index, old_count), old_perm = legacy_plan(q, k, v, seg, n)
        ks, _, st = gather_rows_with_stats(k, v, perm, 128)
        ref = block_stats(ks, 128)
        row["fused_stats_max_abs_err"] = max(float((a - b).abs().max()) for a, b in zip(st[:3], ref[:3]))
        row["same_counts"] = bool(torch.equal(new.block_count, old_count))
        row["same_index_share"] = float((new.block_index == old_index).float().mean())
        row["same_perm_share"] = float((new.perm == old_perm).float().mean())
        row["same_sorted_k_share"] = float((new.k == old_k).all(-1).float().mean())
        checks = ("fused_stats_max_abs_err", "same_counts", "same_index_share", "same_perm_share",
                  "same_sorted_k_share")
        print(n, "checks", {key: row[key] for key in checks})
        results[str(n)] = row
        q = k = v = new = old_k = None  # free before the next size
        torch.cuda.empty_cache()
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
