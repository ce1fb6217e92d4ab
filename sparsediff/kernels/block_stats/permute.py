"""Row gathers of K and V through a permutation, with the block statistics of the gathered K.

``gather_rows_with_stats(k, v, perm, block_size)`` returns ``k[..., perm, :]``, ``v[..., perm, :]`` (both
contiguous) and :class:`BlockStats` of the gathered keys. On CUDA one Triton program per
(batch*head, key block) loads the block's rows through ``perm``, writes them contiguous and reduces the
statistics from the registers: one read and one write of K and V and no second pass over the sorted
keys. Elsewhere the PyTorch path gathers whole rows with ``index_select`` and calls :func:`block_stats`.

``row_norms(x)`` is the float32 L2 norm of every row (the key used to sort), one read of ``x``.
"""

from __future__ import annotations

import math

import torch

from ..backend import choose_backend
from . import BlockStats, _block_counts, block_stats

__all__ = ["gather_rows", "gather_rows_with_stats", "gather_sorted_segments", "row_norms"]

try:
    import triton
    import triton.language as tl

    from .triton import store_score_features, tile_moments, tile_stats
except ImportError:  # pragma: no cover - CPU-only installs
    triton = None

# The sort-side gather walks blocks from the last head's end backwards, so it starts on keys the norm
# pass read last (results do not depend on the order; H100: <= 0.003 ms per plan, within noise).
GATHER_REVERSE = True
# Columns per sort-side gather program: None = the whole (padded) head dim (selection v5); a power of two
# splits each key block into column blocks, one program each (a column's features need only its rows).
# H100, Wan shape: 64 columns / 4 warps 0.198 ms, whole rows / 8 warps 0.223 (docs/benchmarks.md, v6).
GATHER_COLS = 64
# Warps per sort-side gather program; None: 4 up to 8192 elements per program's tile, else 8.
GATHER_WARPS = None


def _check(k, v, perm):
    if k.dim() != 4 or v.dim() != 4 or k.shape[:3] != v.shape[:3]:
        raise ValueError(f"k and v must be (B, H, N, D) with equal B, H, N; got {tuple(k.shape)}, {tuple(v.shape)}")
    if perm.shape != k.shape[:3] or perm.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"perm must be int32/int64 of shape {tuple(k.shape[:3])}, "
                         f"got {perm.dtype} {tuple(perm.shape)}")
    if k.shape[2] == 0:
        raise ValueError("gather_rows needs at least one token")


def _use_triton(backend, x, block_size=None):
    pow2 = block_size is None or (block_size & (block_size - 1)) == 0
    if choose_backend(backend, x, applies=pow2, op="permute_stats") == "torch":
        return False
    if not pow2:
        raise ValueError(f"the Triton path needs a power-of-two block_size, got {block_size}")
    return True


def _gather_torch(x, perm):
    # Whole-row gathers on a (B*H*N, D) view: one index per row instead of an expanded element-wise index.
    b, h, n, d = x.shape
    base = (torch.arange(b * h, device=x.device, dtype=torch.int64) * n).view(b, h, 1)
    rows = (perm.to(torch.int64) + base).reshape(-1)
    return x.reshape(b * h * n, d).index_select(0, rows).view(b, h, n, d)


def gather_rows(k, v, perm):
    """``(k[..., perm, :], v[..., perm, :])`` with ``perm (B, H, N)``; PyTorch row gathers."""
    _check(k, v, perm)
    return _gather_torch(k, perm), _gather_torch(v, perm)


if triton is not None:

    @triton.jit
    def _gather_stats_kernel(
        K, V, Perm, KOut, VOut, Mean, Var, Norm, PermOut,
        stride_kb, stride_kh, stride_kn, stride_kd,
        stride_vb, stride_vh, stride_vn, stride_vd,
        stride_pb, stride_ph, stride_pn,
        num_heads, n, seg, start,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_SIZE: tl.constexpr, WITH_STATS: tl.constexpr,
        FROM_ORDER: tl.constexpr = False, FEATURES: tl.constexpr = False, REVERSE: tl.constexpr = False,
        NCB: tl.constexpr = 1,
    ):
        # NCB column blocks per key block (neighbouring programs): each gathers BLOCK_D columns of the rows.
        pid = tl.program_id(0)
        pid_bh = tl.program_id(1).to(tl.int64)
        if REVERSE:
            # Last head's last block first: the keys the norm pass read last may still be in L2.
            pid = tl.num_programs(0) - 1 - pid
            pid_bh = tl.num_programs(1) - 1 - pid_bh
        blk = pid // NCB
        cb = pid % NCB
        b = pid_bh // num_heads
        h = pid_bh % num_heads
        rows = blk * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
        cols = cb * BLOCK_D + tl.arange(0, BLOCK_D)
        row_ok = rows < n
        col_ok = cols < HEAD_DIM
        mask = row_ok[:, None] & col_ok[None, :]
        if FROM_ORDER:
            # Perm holds in-segment sort orders of the tokens after `start`; the global ids (and the
            # int64 permutation the caller returns) are built here instead of by torch ops.
            body = rows - start
            in_body = row_ok & (body >= 0)
            bodyc = tl.maximum(body, 0)
            local = tl.load(Perm + b * stride_pb + h * stride_ph + bodyc * stride_pn, mask=in_body, other=0)
            src = tl.where(in_body, start + (bodyc // seg) * seg + local.to(tl.int64), rows.to(tl.int64))
            tl.store(PermOut + pid_bh * n + rows, src, mask=row_ok & (cb == 0))
        else:
            src = tl.load(Perm + b * stride_pb + h * stride_ph + rows * stride_pn, mask=row_ok, other=0)
            src = src.to(tl.int64)
        out = (pid_bh * n + rows.to(tl.int64))[:, None] * HEAD_DIM + cols[None, :]
        # Issue both row gathers before any math so their latencies overlap.
        kt = tl.load(K + b * stride_kb + h * stride_kh + src[:, None] * stride_kn + cols[None, :] * stride_kd,
                     mask=mask, other=0.0)
        vt = tl.load(V + b * stride_vb + h * stride_vh + src[:, None] * stride_vn + cols[None, :] * stride_vd,
                     mask=mask, other=0.0)
        tl.store(KOut + out, kt, mask=mask)
        tl.store(VOut + out, vt, mask=mask)
        if WITH_STATS:
            nb = tl.num_programs(0) // NCB
            if FEATURES:
                # BA-Att's key-side score features [μ, μ² + σ², σ²], one (3D,) row per block.
                mean, var = tile_moments(kt, mask, tl.minimum(n - blk * BLOCK_SIZE, BLOCK_SIZE))
                store_score_features(Mean + (pid_bh * nb + blk) * (3 * HEAD_DIM) + cols, mean, var, col_ok, 0.0,
                                     0.0, HEAD_DIM, True)
            else:
                mean, var, norm = tile_stats(kt, mask, tl.minimum(n - blk * BLOCK_SIZE, BLOCK_SIZE))
                so = (pid_bh * nb + blk) * HEAD_DIM + cols
                tl.store(Mean + so, mean, mask=col_ok)
                tl.store(Var + so, var, mask=col_ok)
                tl.store(Norm + pid_bh * nb + blk, norm)

    @triton.jit
    def _row_norms_kernel(
        X, Out, stride_xb, stride_xh, stride_xn, stride_xd, num_heads, n, total,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_ROWS: tl.constexpr,
    ):
        blk = tl.program_id(0)
        pid_bh = tl.program_id(1).to(tl.int64)
        b = pid_bh // num_heads
        h = pid_bh % num_heads
        rows = blk * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        cols = tl.arange(0, BLOCK_D)
        mask = (rows < n)[:, None] & (cols < HEAD_DIM)[None, :]
        x = tl.load(X + b * stride_xb + h * stride_xh + rows[:, None] * stride_xn + cols[None, :] * stride_xd,
                    mask=mask, other=0.0).to(tl.float32)
        # Rows in [n, total) are sort padding: -1 sorts after every real norm.
        norm = tl.where(rows < n, tl.sqrt(tl.sum(x * x, 1)), -1.0)
        tl.store(Out + pid_bh * total + rows, norm, mask=rows < total)


def _warps(block_rows, block_d):
    return 4 if block_rows * block_d <= 8192 else 8


def gather_rows_with_stats(k, v, perm, block_size=128, *, backend=None, with_stats=True):
    """Gather rows of ``k`` and ``v`` ``(B, H, N, D)`` through ``perm (B, H, N)`` and compute the block
    statistics of the gathered keys.

    Returns ``(k_sorted, v_sorted, stats)`` with ``k_sorted[..., i, :] = k[..., perm[..., i], :]`` (contiguous,
    dtype of ``k``) and ``stats`` equal to ``block_stats(k_sorted, block_size)`` (None when ``with_stats`` is
    False). ``perm`` is not checked to be a permutation; ids must lie in ``[0, N)``.
    """
    _check(k, v, perm)
    if not isinstance(block_size, int) or block_size <= 0:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    if not _use_triton(backend, k, block_size):
        ks, vs = gather_rows(k, v, perm)
        return ks, vs, (block_stats(ks, block_size, backend="torch") if with_stats else None)
    b, h, n, d = k.shape
    nb = math.ceil(n / block_size)
    if v.shape[3] != d:
        raise ValueError(f"the fused gather needs equal head dims for k and v, got {d} and {v.shape[3]}")
    ks = torch.empty(b, h, n, d, dtype=k.dtype, device=k.device)
    vs = torch.empty(b, h, n, d, dtype=v.dtype, device=v.device)
    if with_stats:
        mean = torch.empty(b, h, nb, d, dtype=torch.float32, device=k.device)
        var = torch.empty_like(mean)
        norm = torch.empty(b, h, nb, dtype=torch.float32, device=k.device)
    else:
        mean = var = norm = ks  # unused pointers
    block_d = triton.next_power_of_2(d)
    _gather_stats_kernel[(nb, b * h)](
        k, v, perm, ks, vs, mean, var, norm, perm, *k.stride(), *v.stride(), *perm.stride(), h, n, 1, 0,
        HEAD_DIM=d, BLOCK_D=block_d, BLOCK_SIZE=block_size, WITH_STATS=with_stats,
        num_warps=_warps(block_size, block_d),
    )
    stats = BlockStats(mean, var, norm, _block_counts(n, block_size, k.device)) if with_stats else None
    return ks, vs, stats


def row_norms(x, *, backend=None, pad_to=None):
    """float32 L2 norm of every row of ``x`` ``(B, H, N, D)`` -> ``(B, H, N)``; with ``pad_to >= N`` the
    output is ``(B, H, pad_to)`` with -1 after the ``N`` real norms (sort padding, no extra op)."""
    if x.dim() != 4:
        raise ValueError(f"row_norms expects a (B, H, N, D) tensor, got {tuple(x.shape)}")
    b, h, n, d = x.shape
    total = n if pad_to is None else int(pad_to)
    if total < n:
        raise ValueError(f"pad_to must be >= N = {n}, got {pad_to}")
    if not _use_triton(backend, x) or n == 0:
        # float64 inputs: the norm in float64, then float32 (vector_norm refuses a narrowing dtype)
        out = torch.linalg.vector_norm(x, dim=-1, dtype=None if x.dtype == torch.float64 else torch.float32)
        out = out.float()
        return out if total == n else torch.nn.functional.pad(out, (0, total - n), value=-1.0)
    out = torch.empty(b, h, total, dtype=torch.float32, device=x.device)
    block_d = triton.next_power_of_2(d)
    block_rows = max(1, min(64, 8192 // block_d))
    _row_norms_kernel[(triton.cdiv(total, block_rows), b * h)](
        x, out, *x.stride(), h, n, total, HEAD_DIM=d, BLOCK_D=block_d, BLOCK_ROWS=block_rows, num_warps=4,
    )
    return out


def gather_sorted_segments(k, v, order, segment, start, block_size=128):
    """Fused sort-side gather for BA-Att (Triton): ``order (B, H, nseg*segment)`` holds in-segment sort
    orders of the tokens after ``start`` (the first ``start`` stay in place). Returns ``(k_sorted, v_sorted,
    perm int64 (B, H, N), k_features (B, H, nb, 3D) float32)`` with ``k_features`` the key-side score
    features ``[μ, μ² + σ², σ²]`` of the sorted keys' blocks."""
    b, h, n, d = k.shape
    if v.shape != k.shape:
        raise ValueError(f"the fused gather needs k and v of one shape, got {tuple(k.shape)}, {tuple(v.shape)}")
    if block_size & (block_size - 1):
        raise ValueError(f"the Triton path needs a power-of-two block_size, got {block_size}")
    nb = math.ceil(n / block_size)
    ks = torch.empty(b, h, n, d, dtype=k.dtype, device=k.device)
    vs = torch.empty(b, h, n, d, dtype=v.dtype, device=v.device)
    perm = torch.empty(b, h, n, dtype=torch.int64, device=k.device)
    feat = torch.empty(b, h, nb, 3 * d, dtype=torch.float32, device=k.device)
    block_d = triton.next_power_of_2(d)
    cols = block_d if GATHER_COLS is None else max(1, min(block_d, int(GATHER_COLS)))
    if cols & (cols - 1):
        raise ValueError(f"GATHER_COLS must be a power of two, got {GATHER_COLS!r}")
    _gather_stats_kernel[(nb * (block_d // cols), b * h)](
        k, v, order, ks, vs, feat, feat, feat, perm, *k.stride(), *v.stride(), *order.stride(), h, n,
        int(segment), int(start),
        HEAD_DIM=d, BLOCK_D=cols, BLOCK_SIZE=block_size, WITH_STATS=True, FROM_ORDER=True, FEATURES=True,
        REVERSE=GATHER_REVERSE, NCB=block_d // cols, num_warps=GATHER_WARPS or _warps(block_size, cols),
    )
    return ks, vs, perm, feat
