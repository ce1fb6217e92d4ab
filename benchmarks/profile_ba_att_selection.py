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

from sparsediff.kernels import ba_features, block_stats
from sparsediff.kernels.ba_features import query_features, segment_order
from sparsediff.kernels.permute_stats import gather_rows, gather_rows_with_stats, gather_sorted_segments, row_norms
from sparsediff.methods.ba_att import (
    BAAttConfig,
    BAAttMethod,
    _scores_from_features,
    _scores_from_stats,
    _select,
    _sort_keys,
    ba_scores,
)
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


def v2_plan(q, k, v, cfg, seg):
    """Selection v2: torch argsort + offsets, gather with BlockStats, q block_stats, torch score features."""
    ks, vs, perm, st = _sort_keys(k, v, segment=seg, block_size=128, backend="torch")
    return ks, vs, _select(q, ks, cfg, k_stats=st, backend="torch"), perm


def v3_stages(q, k, v, m, seg, n):
    """Selection v3 stages and sweeps (grid of the q-feature kernel, Triton vs torch segment sort)."""
    nseg = math.ceil(n / seg)
    norms = row_norms(k, pad_to=nseg * seg)
    order = segment_order(norms, seg) if seg <= ba_features.MAX_SORT_SEGMENT else None
    torder = norms.view(1, 16, nseg, seg).argsort(dim=-1, descending=True).view(1, 16, -1)
    _, _, _, right = gather_sorted_segments(k, v, torder, seg, 0)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    total = 16 * math.ceil(n / 128)
    row = {
        "v3 norms_padded": bench(lambda: row_norms(k, pad_to=nseg * seg)),
        "v3 argsort_torch (+view)": bench(lambda: norms.view(1, 16, nseg, seg).argsort(dim=-1, descending=True)),
        "v3 gather_sorted_segments (perm + k features)": bench(lambda: gather_sorted_segments(k, v, torder, seg, 0)),
        "v3 k_features_unsorted": bench(lambda: query_features(k, 128)),
        "v3 scores_from_features (q features + matmul)": bench(
            lambda: _scores_from_features(q, right, block_size=128, hkv=16)),
    }
    if order is not None:
        row["v3 segment_order_triton"] = bench(lambda: segment_order(norms, seg))
        row["v3 segment_order_equals_stable_argsort"] = bool(torch.equal(
            order, torch.sort(norms.view(1, 16, nseg, seg), dim=-1, descending=True, stable=True)
            .indices.view(1, 16, -1)))
    for per_sm in (1, 2, 4, 8, 16, None):
        progs = total if per_sm is None else sms * per_sm
        row[f"v3 q_features programs/SM={per_sm}"] = bench(lambda: query_features(q, 128, 0.1, 0.01, programs=progs))
    saved = ba_features.PROGRAMS_PER_SM, ba_features.MAX_SORT_SEGMENT
    for per_sm in (2, 4, 8, None):
        for max_seg in (2048, 0):
            ba_features.PROGRAMS_PER_SM, ba_features.MAX_SORT_SEGMENT = per_sm, max_seg
            sort = "triton" if seg <= max_seg else "torch"
            row[f"v3 plan programs/SM={per_sm} sort={sort}"] = bench(lambda: m.plan(q, k, v))
    ba_features.PROGRAMS_PER_SM, ba_features.MAX_SORT_SEGMENT = saved
    return row


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
        row["plan (v2)"] = bench(lambda: v2_plan(q, k, v, m.config, seg))
        row.update(v3_stages(q, k, v, m, seg, n))
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
        v2_k, _, (v2_index, v2_count), v2_perm = v2_plan(q, k, v, m.config, seg)
        row["v3_vs_v2_same_counts"] = bool(torch.equal(new.block_count, v2_count))
        row["v3_vs_v2_same_index_share"] = float((new.block_index == v2_index).float().mean())
        row["v3_vs_v2_same_perm_share"] = float((new.perm == v2_perm).float().mean())
        row["v3_vs_v2_same_sorted_k_share"] = float((new.k == v2_k).all(-1).float().mean())
        checks = ("v3_vs_v2_same_counts", "v3_vs_v2_same_index_share", "v3_vs_v2_same_perm_share",
                  "v3_vs_v2_same_sorted_k_share", "fused_stats_max_abs_err", "same_counts", "same_index_share",
                  "same_perm_share", "same_sorted_k_share")
        print(n, "checks", {key: row[key] for key in checks})
        results[str(n)] = row
        q = k = v = new = old_k = None  # free before the next size
        torch.cuda.empty_cache()
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
