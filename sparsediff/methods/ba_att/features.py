"""BA-Att selection kernels that write what the next step consumes, with no torch ops in between.

``query_features(q, block_size, scale, c)`` -> ``(B, H, nb, 3D)`` float32 rows ``[s·μq, c·σ²q, c·μq²]``, the
left side of BA-Att's score matmul, straight from one read of ``q``. By default one program per
(block, column block, batch*head) tile on a 2-D grid: a column's moments need only its own rows, so each
128-row block is split into 64-column tiles of 4 warps (:data:`TILE_COLS`; H100, q 32k x 16 heads x 128:
0.062 ms against 0.096 for v5's whole 128 x 128 tile of 8 warps, docs/benchmarks.md "Selection v6").
``programs=`` (or :data:`PROGRAMS_PER_SM`) runs a persistent grid instead, each program walking tiles in a
``tl.range`` loop that Triton software-pipelines through shared memory; it was slower ("Selection v4"). All
grids of one tile layout give the same bits; another layout reduces a column in another float32 order
(tests compare every layout against float64).

``segment_order(norms, seg)`` -> ``(B, H, nseg*seg)`` int64: per segment of ``seg`` norms, the
in-segment indices in descending norm order (ties: lower index first), one Triton program per segment
with ``tl.sort`` on (norm bits, index) packed into int64. Padding norms (< 0) sort last.
"""

from __future__ import annotations

import math

import torch

from ...kernels.backend import sm_count

try:
    import triton
    import triton.language as tl

    from ...kernels.block_stats.triton import store_score_features, tile_moments
except ImportError:  # pragma: no cover - CPU-only installs
    triton = None

__all__ = ["query_features", "segment_order", "features_from_moments", "feature_tile", "PROGRAMS_PER_SM",
           "FEATURE_STAGES", "MAX_SORT_SEGMENT", "TILE_COLS", "TILE_WARPS"]

# Query-feature grid: None = one program per tile on a 2-D grid (default); an int = that many programs
# per SM on the persistent, pipelined grid. H100, q 32k x 16 heads x 128, 128 x 128 tiles: 2-D grid 0.095
# ms; persistent 2/SM 0.105-0.117 (2-4 stages), 1/SM 0.120-0.143; the v3 kernel 0.127 (docs/benchmarks.md, v4).
PROGRAMS_PER_SM = None
# Pipeline depth of the persistent grid's tile loop (each stage holds one tile in shared memory).
FEATURE_STAGES = 3
# Longest segment the Triton sort takes; longer ones use torch.argsort. H100: 256-token segments
# 0.014 ms vs 0.062 for torch, 1560 (padded to 2048) 0.085-0.122 vs 0.044; 512-1024 not measured.
# BA-Att's plan now sorts segments up to segment_sort.MAX_FUSED_SEGMENT in the fused norm launch; this
# kernel remains for the previous path (norm kernel, then sort).
MAX_SORT_SEGMENT = 256
# Columns per feature program: None = the whole (padded) head dim, i.e. one 128 x 128 tile per (block,
# head) at D = 128 (selection v4/v5); a power of two splits each tile into column blocks, one program
# each (a column's mean and variance need only its own rows). H100, q 32k x 16 x 128: 64 columns / 4
# warps 0.062 ms, whole rows / 8 warps 0.096, 64 / 8 0.103, 32 / 2 0.064 (docs/benchmarks.md, v6).
TILE_COLS = 64
# Warps per feature program; None: 4 up to 8192 elements per program's tile, else 8.
TILE_WARPS = None


def features_from_moments(mean, var, scale=None, c=None):
    """PyTorch reference: ``[s·μ, c·σ², c·μ²]`` (query side, ``scale``/``c`` given) or ``[μ, μ²+σ², σ²]``
    (key side) along the last dimension, float32."""
    if scale is None:
        return torch.cat([mean, torch.addcmul(var, mean, mean), var], dim=-1)
    return torch.cat([mean * scale, var * c, mean.square() * c], dim=-1)


if triton is not None:

    @triton.jit
    def _tile_features(X, Out, bh, blk, cb, nb, num_heads, n, sxb, sxh, sxn, sxd, scale, c,
                       HEAD_DIM: tl.constexpr, COLS: tl.constexpr, BLOCK_SIZE: tl.constexpr, KEY: tl.constexpr,
                       ROW64: tl.constexpr):
        """Features of columns ``[cb*COLS, (cb+1)*COLS)`` of tile (bh, blk) into its row of ``Out`` (bh is
        int64; each column's moments are independent of the others). Row offsets are int32 unless ``ROW64``
        (``n * sxn`` past int32): fewer registers per thread."""
        rows = blk * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
        cols = cb * COLS + tl.arange(0, COLS)
        col_ok = cols < HEAD_DIM
        mask = (rows < n)[:, None] & col_ok[None, :]
        if ROW64:
            rows = rows.to(tl.int64)
        x = tl.load(X + (bh // num_heads) * sxb + (bh % num_heads) * sxh + rows[:, None] * sxn + cols[None, :] * sxd,
                    mask=mask, other=0.0)
        mean, var = tile_moments(x, mask, tl.minimum(n - blk * BLOCK_SIZE, BLOCK_SIZE))
        store_score_features(Out + (bh * nb + blk) * (3 * HEAD_DIM) + cols, mean, var, col_ok, scale, c, HEAD_DIM,
                             KEY)

    @triton.jit
    def _features_loop_kernel(
        X, Out, sxb, sxh, sxn, sxd, num_heads, n, nb, total, scale, c,
        HEAD_DIM: tl.constexpr, COLS: tl.constexpr, NCB: tl.constexpr, BLOCK_SIZE: tl.constexpr,
        KEY: tl.constexpr, ROW64: tl.constexpr, STAGES: tl.constexpr,
    ):
        # Persistent: tile t = (bh * nb + blk) * NCB + cb for t = pid, pid + nprog, ...; num_stages makes
        # Triton copy the next tiles' loads into shared memory asynchronously while this one is reduced.
        for t in tl.range(tl.program_id(0), total, tl.num_programs(0), num_stages=STAGES):
            tile = t // NCB
            _tile_features(X, Out, (tile // nb).to(tl.int64), tile % nb, t % NCB, nb, num_heads, n, sxb, sxh, sxn,
                           sxd, scale, c, HEAD_DIM, COLS, BLOCK_SIZE, KEY, ROW64)

    @triton.jit
    def _features_tile_kernel(
        X, Out, sxb, sxh, sxn, sxd, num_heads, n, nb, scale, c,
        HEAD_DIM: tl.constexpr, COLS: tl.constexpr, NCB: tl.constexpr, BLOCK_SIZE: tl.constexpr,
        KEY: tl.constexpr, ROW64: tl.constexpr,
    ):
        # Column blocks of one tile are neighbouring programs: they read the two halves of the same rows.
        pid = tl.program_id(0)
        _tile_features(X, Out, tl.program_id(1).to(tl.int64), pid // NCB, pid % NCB, nb, num_heads, n,
                       sxb, sxh, sxn, sxd, scale, c, HEAD_DIM, COLS, BLOCK_SIZE, KEY, ROW64)

    @triton.jit
    def _segment_order_kernel(Norms, Order, seg, SEG_P2: tl.constexpr):
        s = tl.program_id(0).to(tl.int64)
        nseg = tl.num_programs(0)
        bh = tl.program_id(1).to(tl.int64)
        idx = tl.arange(0, SEG_P2)
        ok = idx < seg
        base = (bh * nseg + s) * seg
        x = tl.load(Norms + base + idx, mask=ok, other=-1.0)
        # Non-negative float32 order like their bits; negatives (padding) map below every real norm.
        bits = tl.where(x >= 0, x.to(tl.int32, bitcast=True).to(tl.int64), -1)
        inv = (SEG_P2 - 1 - idx).to(tl.int64)  # descending sort -> lower index first among equal norms
        key = tl.where(ok, (bits << 32) | inv, -(1 << 62))
        key = tl.sort(key, descending=True)
        src = (SEG_P2 - 1) - (key & 0xFFFFFFFF)
        tl.store(Order + base + idx, src, mask=ok)


def _num_sms(device):
    return sm_count(device) if device.type == "cuda" else 4


def feature_tile(block_size, d):
    """``(COLS, NCB, warps)`` of a feature program for ``block_size``-row blocks of head dim ``d``: columns per
    program, column blocks per tile and warps, from :data:`TILE_COLS` / :data:`TILE_WARPS`. The query
    features' bits depend on this layout (the reduction order over a column's rows), nothing else."""
    block_d = triton.next_power_of_2(d)
    cols = block_d if TILE_COLS is None else max(1, min(block_d, int(TILE_COLS)))
    if cols & (cols - 1):
        raise ValueError(f"TILE_COLS must be a power of two, got {TILE_COLS!r}")
    warps = TILE_WARPS or (4 if block_size * cols <= 8192 else 8)
    return cols, block_d // cols, warps


def query_features(q, block_size, scale=None, c=None, *, programs=None):
    """``[s·μq, c·σ²q, c·μq²]`` per ``block_size``-token block of ``q (B, H, N, D)`` -> ``(B, H, nb, 3D)``
    float32 (Triton); with ``scale=None`` the key-side ``[μ, μ² + σ², σ²]`` instead. ``programs`` sets the
    persistent grid's size (tests use it to exercise the tile loop); by default :data:`PROGRAMS_PER_SM`
    picks the grid."""
    b, h, n, d = q.shape
    if block_size & (block_size - 1):
        raise ValueError(f"query_features needs a power-of-two block_size, got {block_size}")
    nb = math.ceil(n / block_size)
    total = b * h * nb
    out = torch.empty(b, h, nb, 3 * d, dtype=torch.float32, device=q.device)
    if total == 0:
        return out
    # One tile layout for every grid (and for the fused sort launch's query tiles).
    cols, ncb, warps = feature_tile(block_size, d)
    args = (float(scale or 0.0), float(c or 0.0))
    row64 = n * max(q.stride(2), 1) >= 2**31
    meta = dict(HEAD_DIM=d, COLS=cols, NCB=ncb, BLOCK_SIZE=block_size, KEY=scale is None, ROW64=row64,
                num_warps=warps)
    if programs is None and PROGRAMS_PER_SM is not None:
        programs = _num_sms(q.device) * PROGRAMS_PER_SM
    if programs is None:
        _features_tile_kernel[(nb * ncb, b * h)](q, out, *q.stride(), h, n, nb, *args, **meta)
    else:
        _features_loop_kernel[(max(1, min(programs, total * ncb)),)](
            q, out, *q.stride(), h, n, nb, total * ncb, *args, STAGES=FEATURE_STAGES, **meta)
    return out


def segment_order(norms, seg):
    """``norms (B, H, nseg*seg)`` float32 -> in-segment indices ``(B, H, nseg*seg)`` int64, descending norm
    (ties: lower index first), or None when ``seg`` exceeds :data:`MAX_SORT_SEGMENT` (caller falls back)."""
    if triton is None or seg > MAX_SORT_SEGMENT:
        return None
    b, h, total = norms.shape
    order = torch.empty(b, h, total, dtype=torch.int64, device=norms.device)
    seg_p2 = max(triton.next_power_of_2(seg), 16)
    _segment_order_kernel[(total // seg, b * h)](
        norms, order, seg, SEG_P2=seg_p2, num_warps=4 if seg_p2 <= 1024 else 8,
    )
    return order
