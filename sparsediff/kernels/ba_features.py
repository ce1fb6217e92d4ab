"""BA-Att selection kernels that write what the next step consumes, with no torch ops in between.

``query_features(q, block_size, scale, c)`` -> ``(B, H, nb, 3D)`` float32 rows ``[s·μq, c·σ²q, c·μq²]``, the
left side of BA-Att's score matmul, straight from one read of ``q``. The grid is capped at a few programs
per SM; each program walks tiles with a stride and issues the next tile's load before reducing the
current one, so two 128-row tiles are in flight per program (the one-tile-per-program kernel ran at
~2.5x the read floor on an H100; this one is not faster, see PROGRAMS_PER_SM).

``segment_order(norms, seg)`` -> ``(B, H, nseg*seg)`` int64: per segment of ``seg`` norms, the
in-segment indices in descending norm order (ties: lower index first), one Triton program per segment
with ``tl.sort`` on (norm bits, index) packed into int64. Padding norms (< 0) sort last.
"""

from __future__ import annotations

import math

import torch

try:
    import triton
    import triton.language as tl

    from .block_stats_triton import tile_moments
except ImportError:  # pragma: no cover - CPU-only installs
    triton = None

__all__ = ["query_features", "segment_order", "features_from_moments", "PROGRAMS_PER_SM", "MAX_SORT_SEGMENT"]

# Programs per SM of the query-feature grid (None: one program per tile). H100, q 32k x 16 heads:
# 1-2/SM 0.127-0.129 ms, 4 0.131, 8 0.137, one per tile 0.160 (docs/benchmarks.md, "Selection v3").
PROGRAMS_PER_SM = 2
# Longest segment the Triton sort takes; longer ones use torch.argsort. H100: 256-token segments
# 0.014 ms vs 0.062 for torch, 1560 (padded to 2048) 0.121 vs 0.044; 512-1024 not measured.
MAX_SORT_SEGMENT = 256


def features_from_moments(mean, var, scale=None, c=None):
    """PyTorch reference: ``[s·μ, c·σ², c·μ²]`` (query side, ``scale``/``c`` given) or ``[μ, μ²+σ², σ²]``
    (key side) along the last dimension, float32."""
    if scale is None:
        return torch.cat([mean, torch.addcmul(var, mean, mean), var], dim=-1)
    return torch.cat([mean * scale, var * c, mean.square() * c], dim=-1)


if triton is not None:

    @triton.jit
    def _load_tile(X, t, total, nb, num_heads, n, sxb, sxh, sxn, sxd, rows0, cols,
                   HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr):
        bh = t // nb
        blk = t % nb
        rows = blk * BLOCK_SIZE + rows0
        # A tile index past the end loads nothing: its row limit drops to 0 (a plain vector compare,
        # which every Triton version accepts as a load mask).
        limit = tl.where(t < total, n, 0)
        mask = (rows < limit)[:, None] & (cols < HEAD_DIM)[None, :]
        ptrs = X + (bh // num_heads) * sxb + (bh % num_heads) * sxh + rows[:, None] * sxn + cols[None, :] * sxd
        return tl.load(ptrs, mask=mask, other=0.0)

    @triton.jit
    def _query_features_kernel(
        X, Out, sxb, sxh, sxn, sxd, num_heads, n, nb, total, scale, c,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_SIZE: tl.constexpr, KEY: tl.constexpr,
    ):
        pid = tl.program_id(0).to(tl.int64)
        nprog = tl.num_programs(0)
        rows0 = tl.arange(0, BLOCK_SIZE)
        cols = tl.arange(0, BLOCK_D)
        col_ok = cols < HEAD_DIM
        x = _load_tile(X, pid, total, nb, num_heads, n, sxb, sxh, sxn, sxd, rows0, cols, HEAD_DIM, BLOCK_SIZE)
        for t in range(pid, total, nprog):
            # Next tile's load first: its latency overlaps this tile's reductions.
            x_next = _load_tile(X, t + nprog, total, nb, num_heads, n, sxb, sxh, sxn, sxd, rows0, cols,
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
    if device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


def query_features(q, block_size, scale=None, c=None, *, programs=None):
    """``[s·μq, c·σ²q, c·μq²]`` per ``block_size``-token block of ``q (B, H, N, D)`` -> ``(B, H, nb, 3D)``
    float32 (Triton); with ``scale=None`` the key-side ``[μ, μ² + σ², σ²]`` instead. ``programs`` overrides
    the grid size (tests use it to exercise the tile loop)."""
    b, h, n, d = q.shape
    if block_size & (block_size - 1):
        raise ValueError(f"query_features needs a power-of-two block_size, got {block_size}")
    nb = math.ceil(n / block_size)
    total = b * h * nb
    out = torch.empty(b, h, nb, 3 * d, dtype=torch.float32, device=q.device)
    if programs is None:
        programs = total if PROGRAMS_PER_SM is None else _num_sms(q.device) * PROGRAMS_PER_SM
    block_d = triton.next_power_of_2(d)
    _query_features_kernel[(max(1, min(programs, total)),)](
        q, out, *q.stride(), h, n, nb, total, float(scale or 0.0), float(c or 0.0),
        HEAD_DIM=d, BLOCK_D=block_d, BLOCK_SIZE=block_size, KEY=scale is None,
        num_warps=4 if block_size * block_d <= 8192 else 8,
    )
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
