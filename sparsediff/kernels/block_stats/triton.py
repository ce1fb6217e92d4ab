"""Triton kernel for :func:`sparsediff.kernels.block_stats`: one program per (batch*head, block)."""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl


@triton.jit
def tile_moments(x, mask, count):
    """Mean and per-column variance of the ``count`` valid rows of a masked tile (masked entries are 0),
    in float32."""
    x = x.to(tl.float32)
    count = count.to(tl.float32)
    mean = tl.sum(x, 0) / count
    # Two-pass variance on the tile already in registers: no cancellation from E[x^2] - E[x]^2.
    centred = tl.where(mask, x - mean[None, :], 0.0)
    var = tl.sum(centred * centred, 0) / count
    return mean, var


@triton.jit
def store_score_features(out, mean, var, col_ok, scale, c, HEAD_DIM: tl.constexpr, KEY: tl.constexpr):
    """One block's BA-Att score features at ``out`` (a (3D,) row): key side ``[μ, μ² + σ², σ²]``, query side
    ``[s·μ, c·σ², c·μ²]``."""
    if KEY:
        tl.store(out, mean, mask=col_ok)
        tl.store(out + HEAD_DIM, var + mean * mean, mask=col_ok)
        tl.store(out + 2 * HEAD_DIM, var, mask=col_ok)
    else:
        tl.store(out, mean * scale, mask=col_ok)
        tl.store(out + HEAD_DIM, var * c, mask=col_ok)
        tl.store(out + 2 * HEAD_DIM, (mean * mean) * c, mask=col_ok)


@triton.jit
def tile_stats(x, mask, count):
    """:func:`tile_moments` plus the mean row L2 norm of the valid rows."""
    mean, var = tile_moments(x, mask, count)
    xf = x.to(tl.float32)
    norm = tl.sum(tl.sqrt(tl.sum(xf * xf, 1)), 0) / count.to(tl.float32)
    return mean, var, norm


@triton.jit
def _block_stats_kernel(
    X, Mean, Var, Norm,
    stride_xb, stride_xh, stride_xn, stride_xd,
    num_heads, n,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_SIZE: tl.constexpr,
):
    blk = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // num_heads
    h = pid_bh % num_heads
    rows = blk * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    cols = tl.arange(0, BLOCK_D)
    row_ok = rows < n
    mask = row_ok[:, None] & (cols[None, :] < HEAD_DIM)
    ptrs = X + b * stride_xb + h * stride_xh + rows[:, None] * stride_xn + cols[None, :] * stride_xd
    x = tl.load(ptrs, mask=mask, other=0.0)
    mean, var, norm = tile_stats(x, mask, tl.minimum(n - blk * BLOCK_SIZE, BLOCK_SIZE))
    nb = tl.num_programs(0)
    out = (pid_bh * nb + blk) * HEAD_DIM + cols
    tl.store(Mean + out, mean, mask=cols < HEAD_DIM)
    tl.store(Var + out, var, mask=cols < HEAD_DIM)
    tl.store(Norm + pid_bh * nb + blk, norm)


def block_stats_triton(x: torch.Tensor, block_size: int):
    b, h, n, d = x.shape
    nb = math.ceil(n / block_size)
    mean = torch.empty(b, h, nb, d, dtype=torch.float32, device=x.device)
    var = torch.empty_like(mean)
    norm = torch.empty(b, h, nb, dtype=torch.float32, device=x.device)
    block_d = triton.next_power_of_2(d)
    block_rows = triton.next_power_of_2(block_size)
    if block_rows != block_size:
        raise ValueError(f"the Triton block_stats kernel needs a power-of-two block_size, got {block_size}")
    _block_stats_kernel[(nb, b * h)](
        x, mean, var, norm, *x.stride(), h, n,
        HEAD_DIM=d, BLOCK_D=block_d, BLOCK_SIZE=block_size, num_warps=4 if block_size * block_d <= 8192 else 8,
    )
    return mean, var, norm
