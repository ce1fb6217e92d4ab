"""BA-Att's norm sort: key norms, their in-segment sort order and (optionally) the query-side score
features in one Triton launch, plus a merge launch for segments longer than one sorted run.

``norm_segment_order(k, seg)`` -> ``(B, H, nseg*seg)`` int64: for each segment of ``seg`` rows of ``k
(B, H, N, D)``, the in-segment row indices in descending L2-norm order, ties (equal float32 norms) by
lower index first, rows past ``N`` (a ragged last segment's padding) last, NaN norms first. This is
``row_norms(k, pad_to=nseg*seg)`` followed by a stable descending ``argsort`` per segment, bit for bit:
the norms are reduced in the row-norm kernel's tile layout (64 x D rows, the same per-row reduction over
lanes), so they are the same float32 values, and (norm, index) keys have one order.

How: one program per run of ``RUN`` (<= 256) rows of a segment streams the rows in 64-row chunks,
writes their norms to a float32 scratch row and sorts the run's (norm bits, index) keys, packed into
int64, with ``tl.sort`` (a 256-wide ``tl.sort`` is cheap; a 2048-wide one is not: H100, 1560-token
segments, 0.085-0.12 ms for the sort alone against 0.044 for torch's). A segment of one run is done; a
longer one (up to :data:`MAX_FUSED_SEGMENT`, 8 runs) gets a second launch in which each run's program
finds every key's rank in the segment as the sum over runs of the keys above it (a binary search per
run, all runs at once) and scatters the index to that rank.

``q=`` adds BA-Att's query features ``[s·μq, c·σ²q, c·μq²]`` (``ba_features.query_features``) to the
first launch: its tiles run as extra programs of the same grid, with the same tile code, layout and
warps (``ba_features.feature_tile``), so the features are the same bits; the sort programs take those
warps too (4 with the default 128 x 64 query tiles), which leaves the norm tile's reduction unchanged.
"""

from __future__ import annotations

import math

import torch

try:
    import triton
    import triton.language as tl

    from .features import _tile_features, feature_tile
except ImportError:  # pragma: no cover - CPU-only installs
    triton = None

__all__ = ["norm_segment_order", "MAX_FUSED_SEGMENT", "RUN_ROWS", "FUSE_QUERY_FEATURES", "FUSED_MAXNREG",
           "PREFETCH_CHUNKS", "MERGE_SKIP_OWN"]

# Longest segment this path takes (8 runs); longer segments use the row-norm kernel and torch.argsort.
MAX_FUSED_SEGMENT = 2048
# Rows per sorted run (a power of two); segments up to this length are sorted by the first launch alone.
RUN_ROWS = 256
# BA-Att's plan passes q to the sort's launch (False: the selector's own query-feature launch, as before).
FUSE_QUERY_FEATURES = True
# Register cap of the launch with query tiles (v5, 128 x 128 query tiles of 8 warps: the tile alone needs
# 80 on sm_90, uncapped the sort branch lifted the launch to 91). With v6's 4-warp tiles, H100 Wan shape:
# 80 -> 0.142 ms, 64 -> 0.149, none -> 0.143. None: no cap.
FUSED_MAXNREG = 80
# Run programs issue the next 64-row chunk's load before reducing the current one (two chunks in flight).
# Neutral on the H100 (first launch 0.143 vs 0.142 ms at the Wan shape), so off.
PREFETCH_CHUNKS = False
# The merge searches only the other runs (a key's rank in its own run is its position): 1/NRUNS fewer probes,
# the same order; neutral on the H100 (0.093 vs 0.090 ms for norms + runs + merge at the Wan shape).
MERGE_SKIP_OWN = True

if triton is not None:

    @triton.jit
    def _sort_keys_of(x, idx, ok, SEG_P2: tl.constexpr):
        """Descending-sortable int64 keys of float32 norms ``x`` at in-segment positions ``idx``; slots
        past the segment (``~ok``) get a key below every real one."""
        bits = x.to(tl.int32, bitcast=True).to(tl.int64)
        # Norms >= 0 order like their bits; NaN above +inf (torch's descending argsort puts NaN first);
        # negatives (padding) below every real norm.
        bits = tl.where(x != x, 0x7FFFFFFF, tl.where(x >= 0, bits, -1))
        inv = (SEG_P2 - 1 - idx).to(tl.int64)  # descending sort -> lower index first among equal norms
        return tl.where(ok, (bits << 32) | inv, -(1 << 62))

    @triton.jit
    def _norm_chunk(kp, rows, loc, seg, n, sxn, sxd, cols, col_ok):
        real = (loc < seg) & (rows < n)
        return tl.load(kp + rows[:, None].to(tl.int64) * sxn + cols[None, :] * sxd,
                       mask=real[:, None] & col_ok[None, :], other=0.0)

    @triton.jit
    def _run_sort(K, Norms, Out, rid, bh, sxb, sxh, sxn, sxd, num_heads, n, seg, nseg,
                  HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CHUNK: tl.constexpr, RUN: tl.constexpr,
                  NRUNS: tl.constexpr, SEG_P2: tl.constexpr, PREFETCH: tl.constexpr):
        """Norms of run ``rid`` (segment rid // NRUNS) of head ``bh`` (int64) and its sorted keys: the
        in-segment order itself when the segment is one run, else the keys into the merge's scratch."""
        s = rid // NRUNS
        r = rid % NRUNS
        base = (bh * nseg + s) * seg  # this segment's row in Norms / the order
        kp = K + (bh // num_heads) * sxb + (bh % num_heads) * sxh
        cols = tl.arange(0, BLOCK_D)
        col_ok = cols < HEAD_DIM
        for c in tl.static_range(RUN // CHUNK):
            loc = r * RUN + c * CHUNK + tl.arange(0, CHUNK)  # in-segment index
            rows = s * seg + loc
            if PREFETCH:
                # Chunk c was loaded in the previous step: issue chunk c + 1 before this one's norm stores.
                if c == 0:
                    x = _norm_chunk(kp, rows, loc, seg, n, sxn, sxd, cols, col_ok)
                if c + 1 < RUN // CHUNK:
                    x_next = _norm_chunk(kp, rows + CHUNK, loc + CHUNK, seg, n, sxn, sxd, cols, col_ok)
            else:
                x = _norm_chunk(kp, rows, loc, seg, n, sxn, sxd, cols, col_ok)
            x = x.to(tl.float32)
            # The row-norm kernel's expression and per-row reduction: the same float32 bits.
            tl.store(Norms + base + loc, tl.where(rows < n, tl.sqrt(tl.sum(x * x, 1)), -1.0), mask=loc < seg)
            if PREFETCH:
                if c + 1 < RUN // CHUNK:
                    x = x_next
        # Every thread's norms are in memory before any thread reads the whole run back.
        tl.debug_barrier()
        loc = r * RUN + tl.arange(0, RUN)
        ok = loc < seg
        x = tl.load(Norms + base + loc, mask=ok, other=-1.0, cache_modifier=".cg")
        key = tl.sort(_sort_keys_of(x, loc, ok, SEG_P2), descending=True)
        if NRUNS == 1:
            tl.store(Out + base + loc, (SEG_P2 - 1) - (key & 0xFFFFFFFF), mask=ok)
        else:
            tl.store(Out + (bh * nseg + s) * (NRUNS * RUN) + r * RUN + tl.arange(0, RUN), key)

    @triton.jit
    def _run_sort_kernel(
        K, Norms, Out, sxb, sxh, sxn, sxd, num_heads, n, seg, nseg,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CHUNK: tl.constexpr, RUN: tl.constexpr,
        NRUNS: tl.constexpr, SEG_P2: tl.constexpr, PREFETCH: tl.constexpr,
    ):
        _run_sort(K, Norms, Out, tl.program_id(0), tl.program_id(1).to(tl.int64), sxb, sxh, sxn, sxd, num_heads, n,
                  seg, nseg, HEAD_DIM, BLOCK_D, CHUNK, RUN, NRUNS, SEG_P2, PREFETCH)

    @triton.jit
    def _features_run_sort_kernel(
        K, Norms, Out, sxb, sxh, sxn, sxd, num_heads, n, seg, nseg, sort_programs,
        Q, QOut, sqb, sqh, sqn, sqd, q_heads, nq, nqb, scale, c,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CHUNK: tl.constexpr, RUN: tl.constexpr,
        NRUNS: tl.constexpr, SEG_P2: tl.constexpr, PREFETCH: tl.constexpr,
        Q_DIM: tl.constexpr, Q_COLS: tl.constexpr, Q_NCB: tl.constexpr, BLOCK_SIZE: tl.constexpr,
        ROW64: tl.constexpr,
    ):
        # Sort programs first (the longer ones), then one program per query tile.
        pid = tl.program_id(0)
        if pid < sort_programs:
            runs = nseg * NRUNS
            _run_sort(K, Norms, Out, pid % runs, (pid // runs).to(tl.int64), sxb, sxh, sxn, sxd, num_heads, n, seg,
                      nseg, HEAD_DIM, BLOCK_D, CHUNK, RUN, NRUNS, SEG_P2, PREFETCH)
        else:
            t = pid - sort_programs
            tile = t // Q_NCB
            _tile_features(Q, QOut, (tile // nqb).to(tl.int64), tile % nqb, t % Q_NCB, nqb, q_heads, nq, sqb, sqh,
                           sqn, sqd, scale, c, Q_DIM, Q_COLS, BLOCK_SIZE, False, ROW64)

    @triton.jit
    def _run_merge_kernel(Runs, Order, seg, nseg, RUN: tl.constexpr, LOG_RUN: tl.constexpr, NRUNS: tl.constexpr,
                          NR_P2: tl.constexpr, SEG_P2: tl.constexpr, SKIP_OWN: tl.constexpr):
        rid = tl.program_id(0)
        bh = tl.program_id(1).to(tl.int64)
        s = rid // NRUNS
        r = rid % NRUNS
        rp = Runs + (bh * nseg + s) * (NRUNS * RUN)
        a = tl.load(rp + r * RUN + tl.arange(0, RUN))
        o = tl.arange(0, NR_P2)
        # Binary lifting in the other runs at once: pos[i, o] = number of keys of run o above a[i]. Runs
        # are sorted descending and keys distinct, so a[i]'s rank in the segment is i plus the sum.
        if SKIP_OWN:
            o_ok = (o < NRUNS) & (o != r)
        else:
            o_ok = o < NRUNS
        pos = tl.zeros([RUN, NR_P2], dtype=tl.int32)
        for j in tl.static_range(LOG_RUN + 1):
            probe = pos + ((RUN >> j) - 1)
            inside = (probe < RUN) & o_ok[None, :]
            cand = tl.load(rp + o[None, :] * RUN + tl.minimum(probe, RUN - 1), mask=inside, other=0)
            pos = tl.where(inside & (cand > a[:, None]), pos + (RUN >> j), pos)
        rank = tl.sum(pos, 1)
        if SKIP_OWN:
            rank += tl.arange(0, RUN)
        tl.store(Order + (bh * nseg + s) * seg + rank, (SEG_P2 - 1) - (a & 0xFFFFFFFF), mask=a > -(1 << 62))


def _chunk(block_d):
    # The row-norm kernel's tile (permute_stats.row_norms: these rows, 4 warps): the same per-row reduction.
    return max(1, min(64, 8192 // block_d))


def _norm_warps_ok(chunk, block_d, warps):
    """Whether a (chunk, block_d) norm tile reduces its rows as the row-norm kernel's 4-warp tile does
    under ``warps`` warps: always with 4; with more only for a tile of >= 8192 elements (H100: bit-equal
    norms measured at D = 128 with 4, 8 and 16 warps), so that smaller tiles never spread differently."""
    return warps == 4 or chunk * block_d >= 8192


def norm_segment_order(k, seg, *, q=None, block_size=128, scale=None, c=None, return_norms=False):
    """In-segment descending-norm order of the rows of ``k (B, H, N, D)`` -> ``(B, H, nseg*seg)`` int64,
    ``nseg = ceil(N / seg)`` (Triton; CUDA or the interpreter).

    With ``q (B, Hq, Nq, Dq)`` the first launch also writes ``query_features(q, block_size, scale, c)``
    (the same bits) and the result is ``(order, q_features)``; ``q_features`` is None when the query
    tile's warps could change the norm tile's reduction (small head dims: the caller computes them).
    ``return_norms`` appends the padded float32 norms ``(B, H, nseg*seg)`` (-1 past ``N``), equal to
    ``row_norms(k, pad_to=nseg*seg)``."""
    if triton is None:
        raise RuntimeError("norm_segment_order needs Triton")
    if k.dim() != 4:
        raise ValueError(f"norm_segment_order expects a (B, H, N, D) tensor, got {tuple(k.shape)}")
    b, h, n, d = k.shape
    if isinstance(seg, bool) or not isinstance(seg, int) or not 1 <= seg <= MAX_FUSED_SEGMENT:
        raise ValueError(f"seg must be an int in [1, {MAX_FUSED_SEGMENT}], got {seg!r}")
    if n == 0:
        raise ValueError("norm_segment_order needs at least one row")
    nseg = math.ceil(n / seg)
    seg_p2 = max(triton.next_power_of_2(seg), 16)
    block_d = triton.next_power_of_2(d)
    chunk = _chunk(block_d)
    run = max(min(seg_p2, RUN_ROWS), chunk)  # a run holds whole norm tiles
    nruns = math.ceil(seg / run)
    norms = torch.empty(b, h, nseg * seg, dtype=torch.float32, device=k.device)
    order = torch.empty(b, h, nseg * seg, dtype=torch.int64, device=k.device)
    out = order if nruns == 1 else torch.empty(b, h, nseg, nruns * run, dtype=torch.int64, device=k.device)
    meta = dict(HEAD_DIM=d, BLOCK_D=block_d, CHUNK=chunk, RUN=run, NRUNS=nruns, SEG_P2=seg_p2,
                PREFETCH=bool(PREFETCH_CHUNKS) and run > chunk)
    feats = None
    if q is not None and (q.dim() != 4 or block_size & (block_size - 1)):
        raise ValueError(f"q must be (B, Hq, Nq, D) and block_size a power of two, got {tuple(q.shape)}, {block_size}")
    # The query tiles' layout and warps (query_features' choice) set a fused launch's: same bits.
    q_tile = None if q is None else feature_tile(block_size, q.shape[3])
    if q is None or not _norm_warps_ok(chunk, block_d, q_tile[2]):
        warps = 8 if run * block_d > 8192 and _norm_warps_ok(chunk, block_d, 8) else 4
        _run_sort_kernel[(nseg * nruns, b * h)](k, norms, out, *k.stride(), h, n, seg, nseg, **meta, num_warps=warps)
    else:
        qb, qh, nq, qd = q.shape
        nqb = math.ceil(nq / block_size)
        q_cols, q_ncb, q_warps = q_tile
        feats = torch.empty(qb, qh, nqb, 3 * qd, dtype=torch.float32, device=q.device)
        sort_programs = b * h * nseg * nruns
        _features_run_sort_kernel[(sort_programs + qb * qh * nqb * q_ncb,)](
            k, norms, out, *k.stride(), h, n, seg, nseg, sort_programs,
            q, feats, *q.stride(), qh, nq, nqb, float(scale or 0.0), float(c or 0.0), **meta,
            Q_DIM=qd, Q_COLS=q_cols, Q_NCB=q_ncb, BLOCK_SIZE=block_size,
            ROW64=nq * max(q.stride(2), 1) >= 2**31, num_warps=q_warps,
            **({"maxnreg": FUSED_MAXNREG} if FUSED_MAXNREG and k.is_cuda else {}),
        )
    if nruns > 1:
        _run_merge_kernel[(nseg * nruns, b * h)](out, order, seg, nseg, RUN=run, LOG_RUN=run.bit_length() - 1,
                                                 NRUNS=nruns, NR_P2=triton.next_power_of_2(nruns), SEG_P2=seg_p2,
                                                 SKIP_OWN=bool(MERGE_SKIP_OWN), num_warps=4)
    res = (order,) if q is None else (order, feats)
    if return_norms:
        res = res + (norms,)
    return res[0] if len(res) == 1 else res
