"""Plain-PyTorch reference for block statistics (float64 accumulation), written for clarity, not speed."""

from __future__ import annotations

import math

import torch


def block_stats_ref(x: torch.Tensor, block_size: int):
    """Per-block mean, per-dimension (population) variance and mean token L2 norm, in float32."""
    b, h, n, d = x.shape
    nb = math.ceil(n / block_size)
    means, variances, norms = [], [], []
    for j in range(nb):
        tile = x[:, :, j * block_size : (j + 1) * block_size].double()
        means.append(tile.mean(dim=2))
        variances.append(tile.var(dim=2, unbiased=False))
        norms.append(tile.norm(dim=-1).mean(dim=2))
    return (
        torch.stack(means, 2).float(),
        torch.stack(variances, 2).float(),
        torch.stack(norms, 2).float(),
    )
