"""Per-block statistics in one pass: mean, per-dimension variance and mean token L2 norm.

BA-Att scores blocks from these. On CUDA a Triton kernel reads each block once; elsewhere the
PyTorch path computes the same numbers.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from ..backend import choose_backend


class BlockStats(NamedTuple):
    mean: torch.Tensor  # (B, H, nb, D) float32
    var: torch.Tensor  # (B, H, nb, D) float32, population variance over the block's valid tokens
    norm: torch.Tensor  # (B, H, nb) float32, mean L2 norm of the block's valid tokens
    count: torch.Tensor  # (nb,) int32, valid tokens per block (the last one may be ragged)


_counts_cache: dict = {}


def _block_counts(n: int, block_size: int, device) -> torch.Tensor:
    # Cached per shape and device: two tiny kernels per call otherwise, on the selection's hot path.
    key = (n, block_size, str(device))
    counts = _counts_cache.get(key)
    if counts is None:
        nb = math.ceil(n / block_size)
        counts = torch.full((nb,), block_size, dtype=torch.int32)
        counts[-1] = n - (nb - 1) * block_size
        if len(_counts_cache) > 256:
            _counts_cache.clear()
        counts = _counts_cache[key] = counts.to(device)
    return counts


def _block_stats_torch(x: torch.Tensor, block_size: int):
    b, h, n, d = x.shape
    nb = math.ceil(n / block_size)
    xf = torch.nn.functional.pad(x.float(), (0, 0, 0, nb * block_size - n)).view(b, h, nb, block_size, d)
    counts = _block_counts(n, block_size, x.device).float()
    mean = xf.sum(dim=3) / counts[:, None]
    valid = (torch.arange(block_size, device=x.device)[None, :] < counts[:, None])[..., None]
    centred = torch.where(valid, xf - mean[:, :, :, None], 0.0)
    var = centred.square().sum(dim=3) / counts[:, None]
    norm = xf.norm(dim=-1).sum(dim=3) / counts
    return mean, var, norm


def block_stats(x: torch.Tensor, block_size: int = 128, *, backend: str | None = None) -> BlockStats:
    """Statistics of each ``block_size``-token block of ``x`` ``(B, H, N, D)`` (ragged tail allowed)."""
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError(f"block_stats expects a (B, H, N, D) tensor, got {getattr(x, 'shape', type(x))}")
    if not x.dtype.is_floating_point:
        raise TypeError(f"block_stats expects a floating-point tensor, got {x.dtype}")
    if not isinstance(block_size, int) or block_size <= 0:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    if x.shape[2] == 0:
        raise ValueError("block_stats needs at least one token")
    if choose_backend(backend, x, op="block_stats") == "triton":
        from .triton import block_stats_triton

        mean, var, norm = block_stats_triton(x, block_size)
    else:
        mean, var, norm = _block_stats_torch(x, block_size)
    return BlockStats(mean, var, norm, _block_counts(x.shape[2], block_size, x.device))
