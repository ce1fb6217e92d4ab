"""Per-stage GPU timings of BA-Att selection and whole plans: the current path (v6 knobs) against v5's
and v4's in the same run, a sweep of the tile layouts, launch counts and host time.

    python benchmarks/profile_ba_att_selection.py [--n 32768,65536] [--segment 256] [--sweep] [--history]
        [--rounds 3] [--out profile.json]

B=1, H=16, D=128, bf16, sparsity 0.5; ``--segment`` is the sort segment (the video probe's frame is 256
tokens, Wan2.1's 1560). Plans use the default (automatic) ``outlier_keys``, which is 0 on these
norm-sorted keys. v6 changes only float32 reduction orders of the score features (column-split tiles),
so the checks compare the permutation and sorted K, V bit for bit with v5 and v4, the kept blocks as a
share of equal ids, and both versions' features against a float64 reference. ``--sweep`` times the
layout variants (query tile columns / warps / register cap / chunk prefetch, gather columns / warps,
merge search); ``--history`` adds the v2 / first-path block checks of earlier versions.
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

from sparsediff.kernels.block_stats import permute as permute_stats
from sparsediff.kernels.block_stats.permute import gather_sorted_segments, row_norms
from sparsediff.kernels.block_stats.triton import store_score_features, tile_moments
from sparsediff.methods.ba_att import BAAttConfig, BAAttMethod, segment_sort
from sparsediff.methods.ba_att import features as ba_features
from sparsediff.methods.ba_att import scores as ba_att_scores
from sparsediff.methods.ba_att.features import query_features, segment_order
from sparsediff.methods.ba_att.scores import _scores_from_features, _select
from sparsediff.methods.ba_att.sort import _sort_keys
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


V3 = {(ba_att_scores, "query_features"): v3_query_features, (permute_stats, "GATHER_REVERSE"): False}
# Selection v5: whole-row 128 x 128 query and gather tiles (8 warps), no chunk prefetch, merge in all runs.
V5 = {(ba_features, "TILE_COLS"): None, (ba_features, "TILE_WARPS"): None, (permute_stats, "GATHER_COLS"): None,
      (permute_stats, "GATHER_WARPS"): None, (segment_sort, "FUSED_MAXNREG"): 80,
      (segment_sort, "PREFETCH_CHUNKS"): False, (segment_sort, "MERGE_SKIP_OWN"): False}
# The v4 plan: norm kernel + sort (Triton up to 256 tokens, torch argsort above), selector's own q features.
V4 = {**V5, (segment_sort, "MAX_FUSED_SEGMENT"): 0, (segment_sort, "FUSE_QUERY_FEATURES"): False}


def fused(cols, warps, maxnreg, prefetch):
    return {(ba_features, "TILE_COLS"): cols, (ba_features, "TILE_WARPS"): warps,
            (segment_sort, "FUSED_MAXNREG"): maxnreg, (segment_sort, "PREFETCH_CHUNKS"): prefetch}


# First-launch sweep (norms + sorted runs + query tiles): (query tile columns, warps, register cap, prefetch).
FUSED_SWEEP = [(None, None, 80, False), (64, 4, 80, False), (64, 4, 64, False), (64, 4, None, False),
               (64, 4, 80, True), (64, 8, 80, True), (32, 4, 80, True)]
Q_SWEEP = [(None, None), (64, 4), (64, 8), (32, 4), (32, 2)]  # query_features alone: (columns, warps)
GATHER_SWEEP = [(None, None), (64, 4), (64, 8), (32, 4)]  # (columns, warps)

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


def features64(x, bs, scale=None, c=None):
    """float64 reference of the score features of ``x (B, H, N, D)`` (query side with ``scale``/``c``)."""
    b, h, n, d = x.shape
    nb = math.ceil(n / bs)
    xp = torch.nn.functional.pad(x.double(), (0, 0, 0, nb * bs - n)).view(b, h, nb, bs, d)
    cnt = torch.full((nb, 1), float(bs), dtype=torch.float64, device=x.device)
    cnt[-1] = n - (nb - 1) * bs
    rows = (torch.arange(nb * bs, device=x.device).view(nb, bs) < n)[..., None]
    mean = xp.sum(3) / cnt
    var = ((xp - mean[:, :, :, None]) * rows).square().sum(3) / cnt
    return ba_features.features_from_moments(mean, var, scale, c)


def rel_err(got, want):
    """max |got - want| over max |want|, per third of the feature row (mean / second / third term)."""
    d = want.shape[-1] // 3
    return [float((got[..., i * d:(i + 1) * d].double() - want[..., i * d:(i + 1) * d]).abs().max()
                  / want[..., i * d:(i + 1) * d].abs().max()) for i in range(3)]


def checks(q, k, v, m, seg, n, history=False):
    """The current plan against v5's and v4's: permutation and sorted K, V bit for bit, kept blocks as a
    share; the fused sort's order and norms against the row-norm kernel + a stable argsort; q and k
    features of v6 and v5 against float64."""
    row = {}
    new = m.plan(q, k, v)
    for name, setting in (("v5", V5), ("v4", V4)):
        with knobs(setting):
            old = m.plan(q, k, v)
        row[f"v6 vs {name}: same [counts, index, perm, sorted k, sorted v]"] = [
            same(new.block_count, old.block_count), same(new.block_index, old.block_index), same(new.perm, old.perm),
            same(new.k, old.k), same(new.v, old.v)]
        row[f"v6 vs {name}: share of equal kept ids"] = float((new.block_index == old.block_index).float().mean())
        if name == "v5":
            v5_plan = old
    nseg = math.ceil(n / seg)
    ref_norms = row_norms(k, pad_to=nseg * seg)
    ref_order = torch.sort(ref_norms.view(1, 16, nseg, seg), dim=-1, descending=True, stable=True).indices
    order, feats, norms = segment_sort.norm_segment_order(k, seg, q=q, block_size=128, scale=0.1, c=0.01,
                                                         return_norms=True)
    row["fused order == row_norms + stable argsort"] = same(order, ref_order.view(1, 16, -1))
    row["fused norms == row_norms"] = same(norms, ref_norms)
    row["fused q features == query_features (same layout)"] = same(feats, query_features(q, 128, 0.1, 0.01))
    want = features64(q, 128, 0.1, 0.01)
    row["q features v6, rel. max error vs float64 [s*mu, c*var, c*mu^2]"] = rel_err(feats, want)
    with knobs(V5):
        row["q features v5, rel. max error vs float64"] = rel_err(query_features(q, 128, 0.1, 0.01), want)
        _, _, _, right5 = gather_sorted_segments(k, v, order, seg, 0)
    _, _, _, right6 = gather_sorted_segments(k, v, order, seg, 0)
    want = features64(new.k, 128)
    row["k features v6, rel. max error vs float64 [mu, mu^2+var, var]"] = rel_err(right6, want)
    row["k features v5, rel. max error vs float64"] = rel_err(right5, want)
    del want, v5_plan
    if history:
        with knobs({**V4, **V3}):
            old = m.plan(q, k, v)
        row["v6 vs v3: same [perm, sorted k], equal kept ids"] = [
            same(new.perm, old.perm), same(new.k, old.k), float((new.block_index == old.block_index).float().mean())]
        v2_k, _, (v2_index, v2_count), v2_perm = v2_plan(q, k, v, m.config, seg)
        row["v6 vs v2: same counts, equal ids, equal perm"] = [
            same(new.block_count, v2_count), float((new.block_index == v2_index).float().mean()),
            float((new.perm == v2_perm).float().mean())]
    return row


def stages(q, k, v, m, seg, n, sweep=False, rounds=3):
    """Per-stage times (v6 kernels and the v5 / v4 ones), the layout sweep, whole plans (v6, v5, v4 and
    variants; ``rounds`` interleaved rounds)."""
    nseg = math.ceil(n / seg)
    norms = row_norms(k, pad_to=nseg * seg)
    nv = norms.view(1, 16, nseg, seg)
    order = segment_sort.norm_segment_order(k, seg)
    ks, _, _, right = gather_sorted_segments(k, v, order, seg, 0)
    scores = _scores_from_features(q, right, block_size=128, hkv=16)
    left = query_features(q, 128, 0.1, 0.01)
    v4_sort = (lambda: segment_order(norms, seg)) if seg <= ba_features.MAX_SORT_SEGMENT else (
        lambda: nv.argsort(dim=-1, descending=True))
    first = lambda: segment_sort.norm_segment_order(k, seg, q=q, block_size=128, scale=0.1, c=0.01)  # noqa: E731
    gather = lambda: gather_sorted_segments(k, v, order, seg, 0)  # noqa: E731
    row = {}
    for tag, setting in (("v5", V5), ("v6", {})):
        with knobs(setting):
            row[f"{tag}: norms + sorted runs (+ merge)"] = bench(lambda: segment_sort.norm_segment_order(k, seg))
            row[f"{tag}: first launch with q tiles (+ merge)"] = bench(first)
            row[f"{tag}: q features alone"] = bench(lambda: query_features(q, 128, 0.1, 0.01))
            row[f"{tag}: gather K, V + perm + k features"] = bench(gather)
    row.update({
        "v4: norms (padded)": bench(lambda: row_norms(k, pad_to=nseg * seg)),
        "v4: segment sort (" + ("Triton" if seg <= ba_features.MAX_SORT_SEGMENT else "torch argsort") + ")":
            bench(v4_sort),
        "matmul (features given)": bench(lambda: torch.matmul(left, right.transpose(-1, -2))),
        "select (Triton top-k)": bench(lambda: select_from_scores(scores, nq=n, nk=n, block_size=128, density=0.5)),
        "read floor 3 TB/s, one of q/k/v": round(q.numel() * q.element_size() / 3e9, 4),
        "copy ceiling: k.clone() (read + write one of q/k/v)": bench(lambda: k.clone()),
    })
    if sweep:
        for skip in (False, True):
            with knobs({(segment_sort, "MERGE_SKIP_OWN"): skip, (segment_sort, "PREFETCH_CHUNKS"): False}):
                row[f"sweep norms + runs + merge, merge skips own run={skip}"] = bench(
                    lambda: segment_sort.norm_segment_order(k, seg))
        with knobs({(segment_sort, "PREFETCH_CHUNKS"): True}):
            row["sweep norms + runs + merge, chunk prefetch"] = bench(lambda: segment_sort.norm_segment_order(k, seg))
        for cols, warps in Q_SWEEP:
            with knobs({(ba_features, "TILE_COLS"): cols, (ba_features, "TILE_WARPS"): warps}):
                row[f"sweep q features alone, cols={cols} warps={warps}"] = bench(
                    lambda: query_features(q, 128, 0.1, 0.01))
        for cfg in FUSED_SWEEP + FUSED_SWEEP[:1]:  # v5's again at the end: drift within the sweep
            with knobs(fused(*cfg)):
                name = "sweep first launch, cols={} warps={} maxnreg={} prefetch={}".format(*cfg)
                row[name + (" (again)" if name in row else "")] = bench(first)
        for cols, warps in GATHER_SWEEP:
            with knobs({(permute_stats, "GATHER_COLS"): cols, (permute_stats, "GATHER_WARPS"): warps}):
                row[f"sweep gather, cols={cols} warps={warps}"] = bench(gather)
    row["host ms: first launch v6"] = host_ms(first)
    plans = {"plan v6": (m, {}), "plan v5 (same run)": (m, V5), "plan v4 (same run)": (m, V4)}
    for i, extra in enumerate(PLAN_VARIANTS):
        plans[f"plan v6 variant {i}: {extra}"] = (m, PLAN_VARIANTS[extra])
    times = {name: [] for name in plans}
    for _ in range(rounds):
        for name, (method, setting) in plans.items():
            with knobs(setting):
                times[name].append(bench(lambda: method.plan(q, k, v), rep=200))
    for name, ts in times.items():
        row[name] = round(statistics.median(ts), 4)
        row[name + " (rounds)"] = ts
    for name, setting in (("v6", {}), ("v5", V5)):
        with knobs(setting):
            row[f"host ms per plan {name}"] = host_ms(lambda: m.plan(q, k, v))
    row.update(graph_and_dense(q, k, v, m))
    try:
        count, names = launches(lambda: m.plan(q, k, v))
        row["GPU activities per plan v6"], row["GPU activities v6 by name"] = count, names
    except Exception as exc:  # diagnostics only
        row["profiler error"] = repr(exc)[:300]
    return row


def graph_and_dense(q, k, v, m):
    """The plan replayed as one CUDA graph (its GPU time without host gaps: eager plans at 32k are partly
    host-bound) and cuDNN dense attention of the same q, k, v, timed in the same call, for the share."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    row = {}
    try:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):
                m.plan(q, k, v)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            m.plan(q, k, v)
        row["plan v6, CUDA graph replay"] = bench(graph.replay, rep=200)
        del graph
    except Exception as exc:  # diagnostics only
        row["plan graph error"] = repr(exc)[:300]
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        dense = bench(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v), rep=100)
    row["cuDNN dense attention ms"] = dense
    for name in ("plan v6", "plan v6, CUDA graph replay"):
        if name in row:
            row[f"{name}, % of cuDNN dense"] = round(100 * row[name] / dense, 2)
    return row


# Extra whole-plan variants timed with the plans (name -> knobs over the current defaults).
PLAN_VARIANTS = {
    "v6 with v5's gather": {(permute_stats, "GATHER_COLS"): None, (permute_stats, "GATHER_WARPS"): None},
    "v6 with v5's first launch": {k: v for k, v in V5.items() if k[1] not in ("GATHER_COLS", "GATHER_WARPS")},
    "v6, merge searches all runs": {(segment_sort, "MERGE_SKIP_OWN"): False},
}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", default="32768,65536")
    parser.add_argument("--segment", type=int, default=256)
    parser.add_argument("--sweep", action="store_true")
    parser.add_argument("--history", action="store_true")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    names = ("TILE_COLS", "TILE_WARPS", "GATHER_COLS", "GATHER_WARPS", "FUSED_MAXNREG", "PREFETCH_CHUNKS",
             "MERGE_SKIP_OWN", "RUN_ROWS", "MAX_FUSED_SEGMENT", "GATHER_REVERSE")
    mods = (ba_features, permute_stats, segment_sort)
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "segment": args.segment,
               "defaults": {name: getattr(mod, name) for name in names for mod in mods if hasattr(mod, name)}}
    for n in (int(x) for x in args.n.split(",")):
        torch.manual_seed(0)
        q, k, v = (torch.randn(1, 16, n, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        seg = args.segment or n
        # Frame-sorted keys: the automatic outlier_keys is 0, as in the video path.
        m = BAAttMethod(BAAttConfig(sparsity=0.5, min_seq_len=0, sort_segment=seg))
        row = checks(q, k, v, m, seg, n, args.history)
        row.update(stages(q, k, v, m, seg, n, args.sweep, args.rounds))
        results[str(n)] = row
        for name, val in row.items():  # a short table: times, checks and sweep rows, no per-round lists
            if not name.endswith("(rounds)") and "by name" not in name:
                print(n, f"{name[:78]:78s}", val)
        q = k = v = None  # free before the next size
        torch.cuda.empty_cache()
        if args.out:
            with open(args.out, "w") as f:
                json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    main()
