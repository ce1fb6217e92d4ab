"""Per-stage GPU timings of BA-Att selection (norms, sort, gather, q features, matmul, select), the current
path against the previous one (v3: strided q-feature grid with register prefetch, reproduced here; forward
gather order), launch counts, host time and a CUDA-graph replay of the plan (to tell launch gaps from
kernel time). Plans are timed without BA-Att's outlier-key term (``outlier_keys=0``: the pipeline
measured up to v3) and with the default.

    python benchmarks/profile_ba_att_selection.py [--n 32768,65536] [--segment 256] [--out profile.json]

B=1, H=16, D=128, bf16, sparsity 0.5; ``--segment`` is the sort segment (the video probe's frame is 256
tokens, Wan2.1's 1560; 0 sorts the whole sequence). Checks that the current path keeps the same blocks,
permutation and sorted keys as the v3 path, v2's PyTorch path and the older element-wise one, and that the
q/k features of every swept grid are bit-identical to the v3 kernel's.
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

from sparsediff.kernels import ba_features, block_stats, permute_stats
from sparsediff.kernels.ba_features import query_features, segment_order
from sparsediff.kernels.block_stats_triton import tile_moments
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
        out = Out + t * (3 * HEAD_DIM) + cols
        if KEY:
            tl.store(out, mean, mask=col_ok)
            tl.store(out + HEAD_DIM, var + mean * mean, mask=col_ok)
            tl.store(out + 2 * HEAD_DIM, var, mask=col_ok)
        else:
            tl.store(out, mean * scale, mask=col_ok)
            tl.store(out + HEAD_DIM, var * c, mask=col_ok)
            tl.store(out + 2 * HEAD_DIM, (mean * mean) * c, mask=col_ok)
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

FEATURE_GRIDS = {f"persistent {per_sm}/SM stages={stages}": {(ba_features, "PROGRAMS_PER_SM"): per_sm,
                                                             (ba_features, "FEATURE_STAGES"): stages}
                 for per_sm in (1, 2) for stages in (2, 3, 4)}
FEATURE_GRIDS["one tile per program (2-D grid)"] = {(ba_features, "PROGRAMS_PER_SM"): None}


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


def graph_of(fn):
    """Capture ``fn`` in a CUDA graph; returns (graph, its static outputs)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


def same(a, b):
    return bool(torch.equal(a, b))


def checks(q, k, v, m, seg, n):
    """Blocks, permutation and sorted keys of the current path against the v3, v2 and first paths; bit
    equality of the features of every swept grid with the v3 kernel's."""
    row = {}
    new = m.plan(q, k, v)
    with knobs(V3):
        v3 = m.plan(q, k, v)
    row["v4_vs_v3_same_counts"] = same(new.block_count, v3.block_count)
    row["v4_vs_v3_same_index"] = same(new.block_index, v3.block_index)
    row["v4_vs_v3_same_perm"] = same(new.perm, v3.perm)
    row["v4_vs_v3_same_sorted_k_v"] = same(new.k, v3.k) and same(new.v, v3.v)
    v2_k, _, (v2_index, v2_count), v2_perm = v2_plan(q, k, v, m.config, seg)
    row["v4_vs_v2_same_counts"] = same(new.block_count, v2_count)
    row["v4_vs_v2_same_index_share"] = float((new.block_index == v2_index).float().mean())
    row["v4_vs_v2_same_perm_share"] = float((new.perm == v2_perm).float().mean())
    old_k, _, (old_index, old_count), old_perm = legacy_plan(q, k, v, seg, n)
    row["v4_vs_first_same_counts"] = same(new.block_count, old_count)
    row["v4_vs_first_same_index_share"] = float((new.block_index == old_index).float().mean())
    row["v4_vs_first_same_perm_share"] = float((new.perm == old_perm).float().mean())
    # Features: every grid against the v3 kernel (bit equality and max difference).
    ref_q, ref_k = v3_query_features(q, 128, 0.1, 0.01), v3_query_features(k, 128)
    for name, setting in FEATURE_GRIDS.items():
        with knobs(setting):
            got_q, got_k = query_features(q, 128, 0.1, 0.01), query_features(k, 128)
        row[f"q/k features bit_equal_v3 {name}"] = same(got_q, ref_q) and same(got_k, ref_k)
        row[f"q/k features max_abs_diff {name}"] = max(float((got_q - ref_q).abs().max()),
                                                        float((got_k - ref_k).abs().max()))
    nseg = math.ceil(n / seg)
    ref_norms = row_norms(k, pad_to=nseg * seg)
    order = ref_norms.view(1, 16, nseg, seg).argsort(dim=-1, descending=True).view(1, 16, -1)
    with knobs({(permute_stats, "GATHER_REVERSE"): False}):
        fwd = gather_sorted_segments(k, v, order, seg, 0)
    rev = gather_sorted_segments(k, v, order, seg, 0)
    row["gather reverse bit_equal_v3"] = all(same(a, b) for a, b in zip(fwd, rev))
    ks = new.k
    ref = block_stats(ks, 128, backend="torch")
    feat = rev[3]
    row["k_features_vs_block_stats_max_abs"] = float((feat[..., :128] - ref.mean).abs().max())
    return row


def stages(q, k, v, m, seg, n):
    """Per-stage times of the current path, the sweeps, and the whole plan (current and v3, interleaved)."""
    nseg = math.ceil(n / seg)
    norms = row_norms(k, pad_to=nseg * seg)
    order = segment_order(norms, seg)
    triton_sort = order is not None
    if order is None:
        order = norms.view(1, 16, nseg, seg).argsort(dim=-1, descending=True).view(1, 16, -1)
    ks, _, _, right = gather_sorted_segments(k, v, order, seg, 0)
    scores = _scores_from_features(q, right, block_size=128, hkv=16)
    left = query_features(q, 128, 0.1, 0.01)
    row = {
        "norms (padded)": bench(lambda: row_norms(k, pad_to=nseg * seg)),
        "segment sort, " + ("Triton" if triton_sort else "torch argsort"): bench(
            (lambda: segment_order(norms, seg)) if triton_sort else
            (lambda: norms.view(1, 16, nseg, seg).argsort(dim=-1, descending=True))),
        "gather K, V + perm + k features": bench(lambda: gather_sorted_segments(k, v, order, seg, 0)),
        "q features": bench(lambda: query_features(q, 128, 0.1, 0.01)),
        "matmul (features given)": bench(lambda: torch.matmul(left, right.transpose(-1, -2))),
        "q features + matmul": bench(lambda: _scores_from_features(q, right, block_size=128, hkv=16)),
        "select (Triton top-k)": bench(lambda: select_from_scores(scores, nq=n, nk=n, block_size=128, density=0.5)),
        "k features, unsorted keys": bench(lambda: query_features(k, 128)),
        "q features, v3 kernel": bench(lambda: v3_query_features(q, 128, 0.1, 0.01)),
        "read floor 3 TB/s, one of q/k/v": round(q.numel() * q.element_size() / 3e9, 4),
        "copy ceiling: k.clone() (read + write one of q/k/v)": bench(lambda: k.clone()),
    }
    try:  # BA-Att's outlier-key term (scoring side), when this version of the scores has it
        from sparsediff.methods.ba_att import _with_outlier_keys

        row["outlier-key term, m=1 (norms of sorted keys, top-1, exact scores, merge)"] = bench(
            lambda: _with_outlier_keys(scores, left.view(1, 16, -1, left.shape[-1]), ks, 1, block_size=128,
                                       with_var=True))
    except (ImportError, TypeError) as exc:
        row["outlier-key term"] = repr(exc)[:200]
    with knobs({(permute_stats, "GATHER_REVERSE"): False}):
        row["gather, forward block order (v3)"] = bench(lambda: gather_sorted_segments(k, v, order, seg, 0))
    for name, setting in FEATURE_GRIDS.items():
        with knobs(setting):
            row[f"sweep q features {name}"] = bench(lambda: query_features(q, 128, 0.1, 0.01))
    # Host time of each launch (Python + launcher, nothing waiting on the GPU).
    row["host ms: norms"] = host_ms(lambda: row_norms(k, pad_to=nseg * seg))
    row["host ms: segment sort"] = host_ms(
        (lambda: segment_order(norms, seg)) if triton_sort else
        (lambda: norms.view(1, 16, nseg, seg).argsort(dim=-1, descending=True)))
    row["host ms: gather"] = host_ms(lambda: gather_sorted_segments(k, v, order, seg, 0))
    row["host ms: q features"] = host_ms(lambda: query_features(q, 128, 0.1, 0.01))
    row["host ms: q features + matmul"] = host_ms(lambda: _scores_from_features(q, right, block_size=128, hkv=16))
    row["host ms: select"] = host_ms(lambda: select_from_scores(scores, nq=n, nk=n, block_size=128, density=0.5))
    sort_key = [key for key in row if key.startswith("segment sort")][0]
    row["stage sum (norms + sort + gather + q features + matmul + select)"] = round(
        row["norms (padded)"] + row[sort_key] + row["gather K, V + perm + k features"]
        + row["q features + matmul"] + row["select (Triton top-k)"], 4)
    # Whole plan: current vs v3, three interleaved rounds (drift between rounds hits both alike); the
    # pipeline without the outlier-key term (outlier_keys=0, as measured up to v3) and with it (default).
    m0 = BAAttMethod(BAAttConfig(sparsity=0.5, min_seq_len=0, sort_segment=seg, outlier_keys=0)) \
        if hasattr(m.config, "outlier_keys") else m
    plans = {"plan v4": (m0, {}), "plan v3 (same run)": (m0, V3),
             "plan v4, outlier_keys default": (m, {}), "plan v3, outlier_keys default": (m, V3),
             "plan v4, gather forward": (m0, {(permute_stats, "GATHER_REVERSE"): False}),
             "plan v4, q features persistent 2/SM stages=3": (m0, FEATURE_GRIDS["persistent 2/SM stages=3"])}
    times = {name: [] for name in plans}
    for _ in range(3):
        for name, (method, setting) in plans.items():
            with knobs(setting):
                times[name].append(bench(lambda: method.plan(q, k, v), rep=200))
    for name, ts in times.items():
        row[name] = round(statistics.median(ts), 4)
        row[name + " (rounds)"] = ts
    row["host ms per plan v4"] = host_ms(lambda: m0.plan(q, k, v))
    with knobs(V3):
        row["host ms per plan v3"] = host_ms(lambda: m0.plan(q, k, v))
    row["host ms per plan v4, outlier_keys default"] = host_ms(lambda: m.plan(q, k, v))
    try:
        count, names = launches(lambda: m0.plan(q, k, v))
        row["GPU activities per plan v4"], row["GPU activities v4 by name"] = count, names
        row["GPU activities per plan v4, outlier_keys default"] = launches(lambda: m.plan(q, k, v))[0]
        graph, out = graph_of(lambda: m0.plan(q, k, v))
        graph.replay()
        eager = m0.plan(q, k, v)
        row["plan v4, CUDA graph replay"] = bench(graph.replay, rep=200)
        row["graph replay equals eager"] = all(same(a, b) for a, b in zip(out, eager))
        del graph, out
    except Exception as exc:  # diagnostics only
        row["graph/profiler error"] = repr(exc)[:300]
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
                            "GATHER_REVERSE": permute_stats.GATHER_REVERSE}}
    for n in (int(x) for x in args.n.split(",")):
        torch.manual_seed(0)
        q, k, v = (torch.randn(1, 16, n, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        seg = args.segment or n
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
