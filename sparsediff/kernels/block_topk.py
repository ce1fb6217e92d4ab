"""Per-row top-k of block scores straight into the block-sparse kernel's index form.

``block_topk(scores, visible, forced, budget, max_kept, log_count=None)``: for every row
``scores[b, h, i, :]`` keep ``min(max(budget[i], #forced), #visible)`` key blocks, forced blocks first,
then the highest ``scores + log_count`` among the visible ones; write their ids ascending into
``block_index[..., :count]`` (zeros after) and ``block_count``. One Triton program per row replaces a
sort, a scatter and a cumsum over the whole score tensor: the k-th largest key is found by a 32-step
bitwise search on an order-preserving integer image of the float32 logits (a radix select), ties at
the threshold go to the lowest ids.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU-only installs
    triton = None

__all__ = ["block_topk"]


if triton is not None:

    @triton.jit
    def _block_topk_kernel(
        S, LogCount, Visible, Forced, Budget, Index, Count,
        stride_sb, stride_sh, stride_sq, stride_sk,
        num_heads, nqb, nkb, max_kept,
        HAS_LOG: tl.constexpr, ROW_BUDGET: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_OUT: tl.constexpr,
    ):
        qb = tl.program_id(0)
        pid_bh = tl.program_id(1).to(tl.int64)
        b = pid_bh // num_heads
        h = pid_bh % num_heads
        cols = tl.arange(0, BLOCK_K)
        ok = cols < nkb
        s = tl.load(S + b * stride_sb + h * stride_sh + qb * stride_sq + cols * stride_sk, mask=ok, other=0.0)
        s = s.to(tl.float32)
        if HAS_LOG:
            s = s + tl.load(LogCount + cols, mask=ok, other=0.0)
        vis = (tl.load(Visible + qb * nkb + cols, mask=ok, other=0) != 0) & ok
        frc = (tl.load(Forced + qb * nkb + cols, mask=ok, other=0) != 0) & vis
        n_vis = tl.sum(vis.to(tl.int32), 0)
        n_frc = tl.sum(frc.to(tl.int32), 0)
        if ROW_BUDGET:  # one budget per (batch, head, query block)
            want = tl.load(Budget + pid_bh * nqb + qb).to(tl.int32)
        else:
            want = tl.load(Budget + qb).to(tl.int32)
        kk = tl.minimum(tl.maximum(want, n_frc), n_vis)
        # Order-preserving int image of float32 (negative floats: flip the magnitude bits), shifted to
        # [0, 2^32) in int64; forced -> above every float, invisible -> 0, padding -> -1 (never counted).
        bits = s.to(tl.int32, bitcast=True)
        key = (bits ^ ((bits >> 31) & 0x7FFFFFFF)).to(tl.int64) + tl.full([], 2147483648, dtype=tl.int64)
        key = tl.where(frc, tl.full([], 4294967295, dtype=tl.int64), key)
        key = tl.where(vis, key, tl.zeros([], dtype=tl.int64))
        key = tl.where(ok, key, tl.full([], -1, dtype=tl.int64))
        thr = tl.zeros([], dtype=tl.int64)
        one = tl.full([], 1, dtype=tl.int64)
        for i in tl.static_range(32):
            cand = thr | (one << (31 - i))
            c = tl.sum((key >= cand).to(tl.int32), 0)
            thr = tl.where(c >= kk, cand, thr)
        # thr is now the kk-th largest key: keep everything above it and the first ties.
        above = key > thr
        n_above = tl.sum(above.to(tl.int32), 0)
        tie = key == thr
        tie_rank = tl.cumsum(tie.to(tl.int32), 0)
        keep = above | (tie & (tie_rank <= kk - n_above))
        slot = tl.cumsum(keep.to(tl.int32), 0) - 1
        row = pid_bh * nqb + qb
        tl.store(Index + row * max_kept + slot, cols, mask=keep)
        pad = tl.arange(0, BLOCK_OUT)
        tl.store(Index + row * max_kept + pad, tl.zeros([BLOCK_OUT], dtype=tl.int32),
                 mask=(pad >= kk) & (pad < max_kept))
        tl.store(Count + row, kk)


def block_topk(scores, visible, forced, budget, max_kept, log_count=None):
    """``scores (B, H, nqb, nkb)`` -> ``(block_index int32 (B, H, nqb, max_kept), block_count int32 (B, H, nqb))``.

    ``visible``/``forced`` ``(nqb, nkb)`` bool, ``budget`` int ``(nqb,)`` or ``(B, H, nqb)`` (blocks wanted per
    row before the clamp to ``[#forced, #visible]``), ``log_count (nkb,)`` float32 added to the scores when given.
    ``max_kept`` must be at least the largest row count. CUDA (Triton) only: callers keep a PyTorch path.
    """
    if triton is None:
        raise RuntimeError("block_topk needs Triton")
    bsz, h, nqb, nkb = scores.shape
    row_budget = budget.dim() == 3
    if visible.shape != (nqb, nkb) or forced.shape != (nqb, nkb) or budget.shape not in ((nqb,), (bsz, h, nqb)):
        raise ValueError("visible/forced must be (nqb, nkb) and budget (nqb,) or (B, H, nqb)")
    if row_budget:
        budget = budget.contiguous()
    index = torch.empty(bsz, h, nqb, max_kept, dtype=torch.int32, device=scores.device)
    count = torch.empty(bsz, h, nqb, dtype=torch.int32, device=scores.device)
    block_k = max(triton.next_power_of_2(nkb), 16)
    vis = visible.contiguous().view(torch.uint8)
    frc = forced.contiguous().view(torch.uint8)
    log = log_count if log_count is not None else scores  # unused pointer when HAS_LOG is False
    _block_topk_kernel[(nqb, bsz * h)](
        scores, log, vis, frc, budget, index, count, *scores.stride(), h, nqb, nkb, max_kept,
        HAS_LOG=log_count is not None, ROW_BUDGET=row_budget, BLOCK_K=block_k,
        BLOCK_OUT=max(triton.next_power_of_2(max_kept), 16),
        num_warps=4 if block_k <= 1024 else 8,
    )
    return index, count
