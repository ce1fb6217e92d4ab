"""Conversions between a dense boolean block mask and the (block_index, block_count) form.

The index form is what the kernels read: for every query block, the ids of the key blocks it keeps
(ascending, padded to ``max_kept`` columns) and how many of them are valid.
"""

from __future__ import annotations

import torch


def mask_to_index(block_mask: torch.Tensor, max_kept: int | None = None):
    """``(..., nqb, nkb)`` bool mask -> ``(block_index int32 (..., nqb, max_kept), block_count int32)``.

    Kept ids come in ascending order; padding columns hold 0 and are ignored by the kernels.
    ``max_kept`` defaults to the largest row count (at least 1).
    """
    if block_mask.dtype != torch.bool:
        raise TypeError(f"block_mask must be a bool tensor, got {block_mask.dtype}")
    if block_mask.dim() < 2:
        raise ValueError(f"block_mask needs at least 2 dims (nqb, nkb), got shape {tuple(block_mask.shape)}")
    count = block_mask.sum(dim=-1, dtype=torch.int32)
    if max_kept is None:
        max_kept = max(int(count.max().item()) if count.numel() else 0, 1)
    nkb = block_mask.shape[-1]
    # A stable sort of "not kept" puts kept ids first, in ascending order.
    order = torch.sort((~block_mask).to(torch.int8), dim=-1, stable=True).indices
    index = order[..., :max_kept].to(torch.int32)
    if max_kept > nkb:
        pad = torch.zeros(*index.shape[:-1], max_kept - nkb, dtype=torch.int32, device=index.device)
        index = torch.cat([index, pad], dim=-1)
    valid = torch.arange(max_kept, device=index.device) < count[..., None]
    index = torch.where(valid, index, torch.zeros_like(index))
    return index.contiguous(), torch.minimum(count, torch.tensor(max_kept, device=count.device)).contiguous()


def index_to_mask(block_index: torch.Tensor, block_count: torch.Tensor, num_kv_blocks: int) -> torch.Tensor:
    """Inverse of :func:`mask_to_index`: a bool mask ``(..., nqb, num_kv_blocks)``."""
    max_kept = block_index.shape[-1]
    valid = torch.arange(max_kept, device=block_index.device) < block_count[..., None]
    mask = torch.zeros(*block_index.shape[:-1], num_kv_blocks + 1, dtype=torch.bool, device=block_index.device)
    # Invalid slots scatter into a spare column that is dropped afterwards.
    target = torch.where(valid, block_index.long(), torch.full_like(block_index, num_kv_blocks, dtype=torch.long))
    mask.scatter_(-1, target, True)
    return mask[..., :num_kv_blocks]


def dense_index(batch: int, heads: int, num_q_blocks: int, num_kv_blocks: int, device=None):
    """Index form that keeps every key block (density 1)."""
    index = torch.arange(num_kv_blocks, dtype=torch.int32, device=device)
    index = index.expand(batch, heads, num_q_blocks, num_kv_blocks).contiguous()
    count = torch.full((batch, heads, num_q_blocks), num_kv_blocks, dtype=torch.int32, device=device)
    return index, count


def causal_block_mask(num_q_blocks: int, num_kv_blocks: int, nq: int, nk: int, block_size: int, device=None):
    """Key blocks that hold at least one key visible to some query of each query block (end-aligned causal)."""
    last_query = torch.clamp(torch.arange(1, num_q_blocks + 1, device=device) * block_size, max=nq) - 1
    last_key_visible = last_query + (nk - nq)
    first_key = torch.arange(num_kv_blocks, device=device) * block_size
    return first_key[None, :] <= last_key_visible[:, None]
