"""The largest-norm key of each key block, as the features BA-Att's outlier-key term multiplies.

``outlier_key_features(k, block_size)`` -> ``(B, H, nb, 2D)`` float32 rows ``[k*, k*²]`` where ``k*`` is the
row of the block with the largest squared L2 norm (ties: the first such row; padding never wins). On
CUDA one Triton program per (block, batch*head) tile reads the tile once and writes the row: one launch
instead of a norm pass, a top-k, a gather and a concatenation. Elsewhere the same in PyTorch ops.
"""

from __future__ import annotations

import math

import torch

from .backend import choose_backend

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU-only installs
    triton = None


def outlier_key_features_torch(k: torch.Tensor, block_size: int) -> torch.Tensor:
    b, h, n, d = k.shape
    nb = math.ceil(n / block_size)
    kf = k.float()
    sq = kf.square().sum(dim=-1)
    if nb * block_size != n:
        kf = torch.nn.functional.pad(kf, (0, 0, 0, nb * block_size - n))
        sq = torch.nn.functional.pad(sq, (0, nb * block_size - n), value=-1.0)
    best = sq.view(b, h, nb, block_size).argmax(dim=-1)  # the first maximum
    rows = best + torch.arange(0, nb * block_size, block_size, device=k.device)
    keys = kf.gather(2, rows[..., None].expand(b, h, nb, d))
    return torch.cat([keys, keys.square()], dim=-1)


if triton is not None:

    @triton.jit
    def _outlier_key_kernel(K, Out, sxb, sxh, sxn, sxd, num_heads, n,
                            HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_SIZE: tl.constexpr):
        blk = tl.program_id(0)
        nb = tl.num_programs(0)
        bh = tl.program_id(1).to(tl.int64)
        local = tl.arange(0, BLOCK_SIZE)
        rows = blk * BLOCK_SIZE + local
        cols = tl.arange(0, BLOCK_D)
        col_ok = cols < HEAD_DIM
        row_ok = rows < n
        x = tl.load(K + (bh // num_heads) * sxb + (bh % num_heads) * sxh + rows[:, None].to(tl.int64) * sxn
                    + cols[None, :] * sxd, mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
        sq = tl.where(row_ok, tl.sum(x * x, 1), -1.0)
        best = tl.argmax(sq, 0, tie_break_left=True)
        key = tl.sum(tl.where((local == best)[:, None], x, 0.0), 0)
        out = Out + (bh * nb + blk) * (2 * HEAD_DIM) + cols
        tl.store(out, key, mask=col_ok)
        tl.store(out + HEAD_DIM, key * key, mask=col_ok)


def outlier_key_features(k: torch.Tensor, block_size: int, *, backend: str | None = None) -> torch.Tensor:
    """See the module docstring. ``backend``: None (Triton on CUDA), ``"triton"`` or ``"torch"``."""
    if choose_backend(backend, k, op="outlier_key_features") == "torch" or k.dtype == torch.float64:
        return outlier_key_features_torch(k, block_size)
    if block_size & (block_size - 1):
        raise ValueError(f"the Triton outlier-key kernel needs a power-of-two block_size, got {block_size}")
    b, h, n, d = k.shape
    nb = math.ceil(n / block_size)
    out = torch.empty(b, h, nb, 2 * d, dtype=torch.float32, device=k.device)
    if out.numel():
        block_d = triton.next_power_of_2(d)
        _outlier_key_kernel[(nb, b * h)](k, out, *k.stride(), h, n, HEAD_DIM=d, BLOCK_D=block_d,
                                         BLOCK_SIZE=block_size, num_warps=4 if block_size * block_d <= 8192 else 8)
    return out
