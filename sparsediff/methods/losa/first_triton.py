"""Triton kernels of the length-dependent state a LoSA block's first step writes (``losa_step.step_lengths``,
``losa_step.prefix_block_means``): each one launch in place of a dozen small PyTorch ops, inside the captured
first step."""

from __future__ import annotations

import triton
import triton.language as tl

from ...kernels.pdl import pdl_kwargs, pdl_start


@triton.jit
def _step_lengths_kernel(NDev, CountTable, DenseTable, Bias, Count, CountTiles, DenseCount, WinIdx, WinBias,
                         NKB_CAP, SPLITS, TILES, DSPLITS, W, NQ, BS: tl.constexpr, BLOCK: tl.constexpr,
                         USE_PDL: tl.constexpr):
    pdl_start(USE_PDL)
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
                               BLOCK=1024, num_warps=4, **pdl_kwargs(n_dev))


@triton.jit
def _block_means_kernel(K, NDev, MT, MS, LastK, H, NKB_CAP, skb, skh, skn, scale, BS: tl.constexpr, D: tl.constexpr,
                        BLOCK_J: tl.constexpr, CHUNK_R: tl.constexpr, BLOCK_D: tl.constexpr,
                        HAS_SPLIT: tl.constexpr, HAS_LAST: tl.constexpr, USE_PDL: tl.constexpr):
    pdl_start(USE_PDL)
    # One program per (batch x head, BLOCK_J key blocks), CHUNK_R rows of each block per load. Blocks past the
    # prefix's full ones are written as zeros and never read (rows past the prefix may hold anything, even NaN).
    bh = tl.program_id(0)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    nkb = tl.load(NDev).to(tl.int64) // BS
    j = tl.program_id(1).to(tl.int64) * BLOCK_J + tl.arange(0, BLOCK_J)
    r = tl.arange(0, CHUNK_R)
    dd = tl.arange(0, BLOCK_D)
    d_ok = dd < D
    in_cap = j < NKB_CAP
    in_prefix = (j < nkb) & in_cap  # a bad length reads nothing
    compute = in_prefix
    if HAS_LAST:
        # A full block whose last key is the one stored when its mean was computed keeps its mean (and parts):
        # nothing of it but that row is read. NaN marks a block not computed yet (NaN equals nothing).
        last_at = LastK + ((bh.to(tl.int64) * NKB_CAP + j) * D)[:, None] + dd[None, :]  # (B, H, NKB_CAP, D)
        row_ok = in_prefix[:, None] & d_ok[None, :]
        row = tl.load(K + b * skb + h * skh + (j * BS + BS - 1)[:, None] * skn + dd[None, :], mask=row_ok, other=0.0)
        old = tl.load(last_at, mask=row_ok, other=0.0)
        changed = tl.max(((row != old) & row_ok).to(tl.int32), axis=1) > 0
        compute = in_prefix & changed
        fresh = tl.where(in_prefix[:, None], row.to(tl.float32), float("nan"))  # past the prefix: not computed
    write = (compute | (in_cap & ~in_prefix))[:, None] & d_ok[None, :]  # computed blocks; past the prefix: zeros
    if HAS_LAST:
        tl.store(last_at, fresh, mask=write)
    use = compute[:, None, None] & d_ok[None, None, :]
    base = K + b * skb + h * skh + (j * BS)[:, None, None] * skn + dd[None, None, :]
    total = tl.zeros([BLOCK_J, BLOCK_D], tl.float32)
    for r0 in tl.static_range(0, BS, CHUNK_R):  # unrolled: the chunks' loads are independent
        rows = r0 + r
        x = tl.load(base + rows[None, :, None] * skn, mask=use & (rows < BS)[None, :, None], other=0.0)
        total += tl.sum(x.to(tl.float32), axis=1)
    mean = total / BS * scale
    at = (bh.to(tl.int64) * D + dd[None, :]) * NKB_CAP + j[:, None]  # (B, H, D, NKB_CAP), contiguous
    tl.store(MT + at, mean, mask=write)
    if HAS_SPLIT:  # losa_step.split_means: three bfloat16 parts summing to the float32 value
        hi = mean.to(tl.bfloat16)
        rest = mean - hi.to(tl.float32)
        mid = rest.to(tl.bfloat16)
        part = tl.num_programs(0).to(tl.int64) * D * NKB_CAP
        tl.store(MS + at, hi, mask=write)
        tl.store(MS + part + at, mid, mask=write)
        tl.store(MS + 2 * part + at, (rest - mid.to(tl.float32)).to(tl.bfloat16), mask=write)


def block_means_triton(k, n_dev, block_size, scale, means_t, split, last_keys=None, block_j=8, chunk_r=64,
                       num_warps=4):
    # 8 blocks of 64-row loads, 4 warps: the best of 20 settings on an H100 (8 heads, D 128, 128-key blocks):
    # 8.6 / 52 / 104 us at 16k / 64k / 128k keys (2.6 TB/s at 64k), against 16 / 68 / - us with one block per
    # program and 41 / 99 / 160 us for the PyTorch path (mean, mask, split).
    bsz, h, _, d = k.shape
    nkb_cap = means_t.shape[3]
    chunk_r = min(triton.next_power_of_2(block_size), chunk_r)
    _block_means_kernel[(bsz * h, triton.cdiv(nkb_cap, block_j))](
        k, n_dev, means_t, means_t if split is None else split, means_t if last_keys is None else last_keys, h,
        nkb_cap, k.stride(0), k.stride(1), k.stride(2), float(scale), BS=block_size, D=d, BLOCK_J=block_j,
        CHUNK_R=chunk_r, BLOCK_D=max(16, triton.next_power_of_2(d)), HAS_SPLIT=split is not None,
        HAS_LAST=last_keys is not None, num_warps=num_warps,
        **pdl_kwargs(k))
