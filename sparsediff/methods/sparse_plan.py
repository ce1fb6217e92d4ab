"""What a block-sparse method computes, once planned: the keys the kernel reads and the blocks it keeps."""

from __future__ import annotations

from typing import NamedTuple

import torch


class SparsePlan(NamedTuple):
    """What a block-sparse method will compute: keys/values as the kernel sees them (possibly
    permuted), the kept blocks (ids refer to those keys) and the key permutation (None = identity)."""

    k: torch.Tensor
    v: torch.Tensor
    block_index: torch.Tensor
    block_count: torch.Tensor
    perm: torch.Tensor | None
    block_size: int | None = None  # of block_index (None: the method's configured block_size)
