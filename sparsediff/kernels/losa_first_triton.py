"""Triton kernels of the length-dependent state a LoSA block's first step writes (``losa_step.step_lengths``,
``losa_step.prefix_block_means``): each one launch in place of a dozen small PyTorch ops, inside the captured
first step."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _step_lengths_kernel(NDev, CountTable, DenseTable, Bias, Count, CountTiles, DenseCount, WinIdx, WinBias,
                         NKB_CAP, SPLITS, TILES, DSPLITS, W, NQ, BS: tl.constexpr, BLOCK: tl.constexpr):
    n = tl.load(NDev).to(tl.int64)
    nkb = n // BS
    for j0 in range(0, NKB_CAP, BLOCK):
        j = j0 + tl.arange(0, BLOCK)
        tl.store(Bias + j, tl.where(j < nkb, 0.0, -1e30), mask=j < NKB_CAP)
    for i0 in range(0, SPLITS * TILES, BLOCK):  # count_tiles[s * TILES + t] = count[s] = table[nkb, s]
        i = i0 + tl.arange(0, BLOCK)
        ok = i < SPLITS * TILES
        s = i // TILES
        kept = tl.load(CountTable + nkb * SPLITS + s, mask=ok, other=0)
        tl.store(CountTiles + i, kept, mask=ok)
        tl.store(Count + s, kept, mask=ok & (i % TILES == 0))
    for s0 in range(0, DSPLITS, BLOCK):
        s = s0 + tl.arange(0, BLOCK)
        tl.store(DenseCount + s, tl.load(DenseTable + nkb * DSPLITS + s, mask=s < DSPLITS, other=0),
                 mask=s < DSPLITS)
    start = nkb * BS
    last = n + (NQ - 1)
    for r0 in range(0, W, BLOCK):
        r = r0 + tl.arange(0, BLOCK)
        tl.store(WinIdx + r, tl.minimum(r + start, last), mask=r < W)
        tl.store(WinBias + r, tl.where(r <= last - start, 0.0, float("-inf")), mask=r < W)


def step_lengths_triton(n_dev, block_size, nq, count_table, dense_table, bias, count, count_tiles, dense_count,
                        win_idx, win_bias):
    splits, dsplits = count_table.shape[1], dense_table.shape[1]
    tiles = count_tiles.numel() // splits
    _step_lengths_kernel[(1,)](n_dev, count_table, dense_table, bias, count, count_tiles, dense_count, win_idx,
                               win_bias, bias.numel(), splits, tiles, dsplits, win_idx.numel(), nq, BS=block_size,
                               BLOCK=1024, num_warps=4)


@triton.jit
def _block_means_kernel(K, NDev, MT, MS, H, NKB_CAP, skb, skh, skn, scale, BS: tl.constexpr, D: tl.constexpr,
                        BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, HAS_SPLIT: tl.constexpr):
    # One program per (batch x head, key block): blocks past the prefix's full ones are written as zeros and
    # never read (rows past the prefix may hold anything, even NaN).
    bh = tl.program_id(0)
    j = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    nkb = tl.load(NDev).to(tl.int64) // BS
    dd = tl.arange(0, BLOCK_D)
    d_ok = dd < D
    mean = tl.zeros([BLOCK_D], tl.float32)
    if j < nkb:
        r = tl.arange(0, BLOCK_R)
        rows = j.to(tl.int64) * BS + r
        x = tl.load(K + b * skb + h * skh + rows[:, None] * skn + dd[None, :],
                    mask=(r[:, None] < BS) & d_ok[None, :], other=0.0)
        mean = tl.sum(x.to(tl.float32), axis=0) / BS * scale
    at = (bh.to(tl.int64) * D + dd) * NKB_CAP + j  # (B, H, D, NKB_CAP), contiguous
    tl.store(MT + at, mean, mask=d_ok)
    if HAS_SPLIT:  # losa_step.split_means: three bfloat16 parts summing to the float32 value
        hi = mean.to(tl.bfloat16)
        rest = mean - hi.to(tl.float32)
        mid = rest.to(tl.bfloat16)
        part = tl.num_programs(0).to(tl.int64) * D * NKB_CAP
        tl.store(MS + at, hi, mask=d_ok)
        tl.store(MS + part + at, mid, mask=d_ok)
        tl.store(MS + 2 * part + at, (rest - mid.to(tl.float32)).to(tl.bfloat16), mask=d_ok)


def block_means_triton(k, n_dev, block_size, scale, means_t, split):
    bsz, h, _, d = k.shape
    nkb_cap = means_t.shape[3]
    _block_means_kernel[(bsz * h, nkb_cap)](
        k, n_dev, means_t, means_t if split is None else split, h, nkb_cap, k.stride(0), k.stride(1), k.stride(2),
        float(scale), BS=block_size, D=d, BLOCK_R=triton.next_power_of_2(block_size),
        BLOCK_D=max(16, triton.next_power_of_2(d)), HAS_SPLIT=split is not None, num_warps=4)
