"""Per-stage GPU timings of BA-Att selection and whole plans, the current path (v5: norms, in-segment
sorted runs (+ merge) and the query features in one launch) against the previous one (v4: norm kernel,
Triton or torch sort, the selector's own query-feature launch), launch counts and host time.

    python benchmarks/profile_ba_att_selection.py [--n 32768,65536] [--segment 256] [--out profile.json]

B=1, H=16, D=128, bf16, sparsity 0.5; ``--segment`` is the sort segment (the video probe's frame is 256
tokens, Wan2.1's 1560). Plans use the default (automatic) ``outlier_keys``, which is 0 on these
norm-sorted keys. Checks that the current plan keeps the same blocks, permutation and sorted keys and
values as v4's path, v3's (its strided query-feature kernel is reproduced here), v2's PyTorch path and
the first element-wise one, and that the fused launch's order, norms and query features are the bits of
the row-norm kernel + a stable argsort and of ``query_features``. The per-grid sweeps of v4 are in
docs/results/profile_ba_att_selection_h100_v4.json.
"""
import argparse
import contextlib
import json
import math
import statistics
import time

import torch
import triton
import triton.language as tl
import triton.testing as tt

from sparsediff.kernels import ba_features, permute_stats, segment_sort
from sparsediff.kernels.ba_features import query_features, segment_order
from sparsediff.kernels.block_stats_triton import store_score_features, tile_moments
from sparsediff.kernels.permute_stats import gather_sorted_segments, row_norms
from sparsediff.methods import ba_att
from sparsediff.methods.ba_att import BAAttConfig, BAAttMethod, _scores_from_features, _select, _sort_keys, ba_scores
from sparsediff.methods.block_select import select_from_scores


@triton.jit
def _v3_load_tile(X, t, total, nb, num_heads, n, sxb, sxh, sxn, sxd, rows0, cols,
                  HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    bh = t // nb
    blk = t % nb
    rows = blk * BLOCK_SIZE + rows0
    limit = tl.where(t < total, n, 0)
    mask = (rows < limit)[:, None] & (cols < HEAD_DIM)[None, :]
    ptrs = X + (bh // num_heads) * sxb + (bh % num_heads) * sxh + rows[:, None] * sxn + cols[None, :] * sxd
    return tl.load(ptrs, mask=mask, other=0.0)


@triton.jit
def _v3_features_kernel(
    X, Out, sxb, sxh, sxn, sxd, num_heads, n, nb, total, scale, c,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_SIZE: tl.constexpr, KEY: tl.constexpr,
):
    """The v3 query-feature kernel: strided grid, next tile prefetched into registers."""
    pid = tl.program_id(0).to(tl.int64)
    nprog = tl.num_programs(0)
    rows0 = tl.arange(0, BLOCK_SIZE)
    cols = tl.arange(0, BLOCK_D)
    col_ok = cols < HEAD_DIM
    x = _v3_load_tile(X, pid, total, nb, num_heads, n, sxb, sxh, sxn, sxd, rows0, cols, HEAD_DIM, BLOCK_SIZE)
    for t in range(pid, total, nprog):
        x_next = _v3_load_tile(X, t + nprog, total, nb, num_heads, n, sxb, sxh, sxn, sxd, rows0, cols,
                               HEAD_DIM, BLOCK_SIZE)
        blk = t % nb
        mask = ((blk * BLOCK_SIZE + rows0) < n)[:, None] & col_ok[None, :]
        mean, var = tile_moments(x, mask, tl.minimum(n - blk * BLOCK_SIZE, BLOCK_SIZE))
        store_score_features(Out + t * (3 * HEAD_DIM) + cols, mean, var, col_ok, scale, c, HEAD_DIM, KEY)
        x = x_next


def v3_query_features(q, block_size, scale=None, c=None):
    """Selection v3's query_features (2 programs per SM, its shipped default)."""
    b, h, n, d = q.shape
    nb = math.ceil(n / block_size)
    total = b * h * nb
    out = torch.empty(b, h, nb, 3 * d, dtype=torch.float32, device=q.device)
    block_d = triton.next_power_of_2(d)
    programs = 2 * torch.cuda.get_device_properties(q.device).multi_processor_count
    _v3_features_kernel[(max(1, min(programs, total)),)](
        q, out, *q.stride(), h, n, nb, total, float(scale or 0.0), float(c or 0.0),
        HEAD_DIM=d, BLOCK_D=block_d, BLOCK_SIZE=block_size, KEY=scale is None,
        num_warps=4 if block_size * block_d <= 8192 else 8,
    )
    return out


V3 = {(ba_att, "query_features"): v3_query_features, (permute_stats, "GATHER_REVERSE"): False}
# The v4 plan: norm kernel + sort (Triton up to 256 tokens, torch argsort above), selector's own q features.
V4 = {(segment_sort, "MAX_FUSED_SEGMENT"): 0, (segment_sort, "FUSE_QUERY_FEATURES"): False}
# v5 without the query tiles in the sort's launch (sort fused, q features separate).
V5_SPLIT_Q = {(segment_sort, "FUSE_QUERY_FEATURES"): False}
V5_NO_REGCAP = {(segment_sort, "FUSED_MAXNREG"): None}

@contextlib.contextmanager
def knobs(settings):
    """Temporarily set module-level kernel knobs ``{(module, name): value}``."""
    saved = {key: getattr(*key) for key in settings}
    for (mod, name), value in settings.items():
        setattr(mod, name, value)
    try:
        yield
    finally:
        for (mod, name), value in saved.items():
            setattr(mod, name, value)


def legacy_sort_keys(k, v, seg):
    """The first sort_keys: fp32 norms, pad, segment argsort, element-wise gather with an expanded index."""
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


def bench(fn, rep=100):
    return round(float(tt.do_bench(fn, warmup=25, rep=rep, return_mode="median")), 4)


def host_ms(fn, calls=20):
    """Host time per call with nothing waiting on the GPU (launch and Python cost, not kernel time)."""
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    return round((t1 - t0) / calls * 1e3, 4)


def launches(fn):
    """GPU activities (kernels, memsets, copies) of one call, by name, from torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    names = {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            names[e.name[:60]] = names.get(e.name[:60], 0) + 1
    return sum(names.values()), names


def same(a, b):
    return bool(torch.equal(a, b))


def checks(q, k, v, m, seg, n):
    """Blocks, permutation, sorted keys and values of the current (v5) plan against v4's path, v3's, v2's
    PyTorch path and the first one; the fused sort's order, norms and query features bit for bit."""
    row = {}
    new = m.plan(q, k, v)
    variants = (("v4", V4), ("v3", {**V4, **V3}), ("v5 split q", V5_SPLIT_Q), ("v5 no reg cap", V5_NO_REGCAP))
    for name, setting in variants:
        with knobs(setting):
            old = m.plan(q, k, v)
        row[f"v5_vs_{name}_same [counts, index, perm, sorted k, sorted v]"] = [
            same(new.block_count, old.block_count), same(new.block_index, old.block_index), same(new.perm, old.perm),
            same(new.k, old.k), same(new.v, old.v)]
    v2_k, _, (v2_index, v2_count), v2_perm = v2_plan(q, k, v, m.config, seg)
    row["v5_vs_v2_same_counts"] = same(new.block_count, v2_count)
    row["v5_vs_v2_same_index_share"] = float((new.block_index == v2_index).float().mean())
    row["v5_vs_v2_same_perm_share"] = float((new.perm == v2_perm).float().mean())
    old_k, _, (old_index, old_count), old_perm = legacy_plan(q, k, v, seg, n)
    row["v5_vs_first_same_counts"] = same(new.block_count, old_count)
    row["v5_vs_first_same_perm_share"] = float((new.perm == old_perm).float().mean())
    nseg = math.ceil(n / seg)
    ref_norms = row_norms(k, pad_to=nseg * seg)
    ref_order = torch.sort(ref_norms.view(1, 16, nseg, seg), dim=-1, descending=True, stable=True).indices
    order, feats, norms = segment_sort.norm_segment_order(k, seg, q=q, block_size=128, scale=0.1, c=0.01,
                                                         return_norms=True)
    row["fused order == row_norms + stable argsort"] = same(order, ref_order.view(1, 16, -1))
    row["fused norms == row_norms"] = same(norms, ref_norms)
    row["fused q features == query_features == v3 kernel"] = [same(feats, query_features(q, 128, 0.1, 0.01)),
                                                              same(feats, v3_query_features(q, 128, 0.1, 0.01))]
    return row


def stages(q, k, v, m, seg, n):
    """Per-stage times (v5 kernels and the v4 ones they replace) and whole plans (v5, v4, v5 variants;
    three interleaved rounds)."""
    nseg = math.ceil(n / seg)
    norms = row_norms(k, pad_to=nseg * seg)
    nv = norms.view(1, 16, nseg, seg)
    order = segment_sort.norm_segment_order(k, seg)
    ks, _, _, right = gather_sorted_segments(k, v, order, seg, 0)
    scores = _scores_from_features(q, right, block_size=128, hkv=16)
    left = query_features(q, 128, 0.1, 0.01)
    v4_sort = (lambda: segment_order(norms, seg)) if seg <= ba_features.MAX_SORT_SEGMENT else (
        lambda: nv.argsort(dim=-1, descending=True))
    row = {
        "v4: norms (padded)": bench(lambda: row_norms(k, pad_to=nseg * seg)),
        "v4: segment sort (" + ("Triton" if seg <= ba_features.MAX_SORT_SEGMENT else "torch argsort") + ")":
            bench(v4_sort),
        "v4: q features": bench(lambda: query_features(q, 128, 0.1, 0.01)),
        "v5: norms + sorted runs (+ merge), one launch (two above 256)": bench(
            lambda: segment_sort.norm_segment_order(k, seg)),
        "v5: the same + q features in the first launch": bench(
            lambda: segment_sort.norm_segment_order(k, seg, q=q, block_size=128, scale=0.1, c=0.01)),
        "gather K, V + perm + k features": bench(lambda: gather_sorted_segments(k, v, order, seg, 0)),
        "matmul (features given)": bench(lambda: torch.matmul(left, right.transpose(-1, -2))),
        "select (Triton top-k)": bench(lambda: select_from_scores(scores, nq=n, nk=n, block_size=128, density=0.5)),
        "read floor 3 TB/s, one of q/k/v": round(q.numel() * q.element_size() / 3e9, 4),
        "copy ceiling: k.clone() (read + write one of q/k/v)": bench(lambda: k.clone()),
    }
    with knobs(V5_NO_REGCAP):
        row["v5: sort + q features, no register cap"] = bench(
            lambda: segment_sort.norm_segment_order(k, seg, q=q, block_size=128, scale=0.1, c=0.01))
    row["host ms: v5 sort + q features"] = host_ms(
        lambda: segment_sort.norm_segment_order(k, seg, q=q, block_size=128, scale=0.1, c=0.01))
    row["host ms: v4 norms + sort"] = host_ms(lambda: (row_norms(k, pad_to=nseg * seg), v4_sort()))
    m0 = BAAttMethod(BAAttConfig(sparsity=0.5, min_seq_len=0, sort_segment=seg, outlier_keys=0))
    plans = {"plan v5": (m, {}), "plan v4 (same run)": (m, V4), "plan v5, q features split": (m, V5_SPLIT_Q),
             "plan v5, no register cap": (m, V5_NO_REGCAP), "plan v5, outlier_keys=0": (m0, {})}
    times = {name: [] for name in plans}
    for _ in range(3):
        for name, (method, setting) in plans.items():
            with knobs(setting):
                times[name].append(bench(lambda: method.plan(q, k, v), rep=200))
    for name, ts in times.items():
        row[name] = round(statistics.median(ts), 4)
        row[name + " (rounds)"] = ts
    row["host ms per plan v5"] = host_ms(lambda: m.plan(q, k, v))
    with knobs(V4):
        row["host ms per plan v4"] = host_ms(lambda: m.plan(q, k, v))
    try:
        for name, setting in (("v5", {}), ("v4", V4)):
            with knobs(setting):
                count, names = launches(lambda: m.plan(q, k, v))
            row[f"GPU activities per plan {name}"], row[f"GPU activities {name} by name"] = count, names
    except Exception as exc:  # diagnostics only
        row["profiler error"] = repr(exc)[:300]
    return row


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", default="32768,65536")
    parser.add_argument("--segment", type=int, default=256)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "segment": args.segment,
               "defaults": {"PROGRAMS_PER_SM": ba_features.PROGRAMS_PER_SM,
                            "FEATURE_STAGES": ba_features.FEATURE_STAGES,
                            "MAX_SORT_SEGMENT": ba_features.MAX_SORT_SEGMENT,
                            "GATHER_REVERSE": permute_stats.GATHER_REVERSE,
                            "MAX_FUSED_SEGMENT": segment_sort.MAX_FUSED_SEGMENT, "RUN_ROWS": segment_sort.RUN_ROWS,
                            "FUSED_MAXNREG": segment_sort.FUSED_MAXNREG}}
    for n in (int(x) for x in args.n.split(",")):
        torch.manual_seed(0)
        q, k, v = (torch.randn(1, 16, n, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        seg = args.segment or n
        # Frame-sorted keys: the automatic outlier_keys is 0, as in the video path.
        m = BAAttMethod(BAAttConfig(sparsity=0.5, min_seq_len=0, sort_segment=seg))
        row = checks(q, k, v, m, seg, n)
        print(n, "checks", row, flush=True)
        row.update(stages(q, k, v, m, seg, n))
        for name, val in row.items():
            print(n, f"{name:60s}", val)
        results[str(n)] = row
        q = k = v = None  # free before the next size
        torch.cuda.empty_cache()
        if args.out:
            with open(args.out, "w") as f:
                json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
