"""Attention of one short block of queries to a long prefix, split over key chunks (flash-decoding).

In block diffusion the active block has 32-128 queries and the prefix up to 128k+ keys. The
block-sparse kernel runs one program per (query block, head): with a single query block that is
only B * H programs, too few to fill a GPU, each walking the whole prefix. Here the key blocks are
cut into ``splits`` chunks and the query block is repeated once per chunk (as extra query blocks of
one kernel call, each with its chunk's block ids), so ``splits`` times more programs each read a
share of the prefix; the partial results merge exactly by their LSE. FlashBlock and LoSA use it for
their prefix attention; it also takes a block mask (sparse prefix attention).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..kernels import block_sparse_attention, index_to_mask, mask_to_index
from .dense import dense_attention


def choose_splits(q, num_kv_blocks: int, min_blocks_per_split: int = 4) -> int:
    """Enough programs for about 4 waves on this GPU, at least ``min_blocks_per_split`` blocks each."""
    if not q.is_cuda:
        return 1
    sms = torch.cuda.get_device_properties(q.device).multi_processor_count
    want = math.ceil(4 * sms / (q.shape[0] * q.shape[1]))
    return max(1, min(want, num_kv_blocks // min_blocks_per_split))


def split_index(block_index, block_count, num_kv_blocks: int, splits: int, device):
    """Block ids of each split as one query block each: ``(index, count, splits)`` with ``index``
    ``(B' or 1, H' or 1, splits, chunk)``. Dense (``block_index=None``) when no mask is given."""
    chunk = math.ceil(num_kv_blocks / splits)
    splits = math.ceil(num_kv_blocks / chunk)
    owner = torch.arange(num_kv_blocks, device=device) // chunk  # the split each key block belongs to
    per_split = owner[None, :] == torch.arange(splits, device=device)[:, None]  # (S, nkb)
    if block_index is None:
        mask = per_split[None, None]
    else:
        mask = index_to_mask(block_index, block_count, num_kv_blocks) & per_split  # (B', H', S, nkb)
    index, count = mask_to_index(mask, max_kept=chunk)  # a fixed width: no device sync
    return index, count, splits


_DENSE_SPLITS: dict = {}


def prefix_attention(q, k, v, block_index=None, block_count=None, *, scale=None, block_size=128, splits=None,
                     split=None):
    """``(out, lse)`` of q ``(B, Hq, Nq, D)`` against k, v ``(B, Hkv, Nk, D)``, dense or over the kept
    key blocks ``block_index / block_count`` (one query block: ``(B or 1, Hq or 1, 1, max_kept)``).

    ``splits=None`` picks a split count for the GPU (1 on CPU); queries longer than one block run as
    a plain kernel call. ``split``: a precomputed :func:`split_index` result (callers that reuse one
    selection for many steps), which then replaces ``block_index`` and ``splits``.
    """
    bsz, hq, nq, d = q.shape
    nkb = math.ceil(k.shape[2] / block_size)
    sparse = block_index is not None
    if split is None:
        splits = choose_splits(q, nkb) if splits is None else max(1, min(int(splits), nkb))
        if nq > block_size or splits == 1:
            if not sparse:
                return dense_attention(q, k, v, scale=scale, return_lse=True)
            nqb = math.ceil(nq / block_size)
            if block_index.shape[2] == 1 and nqb > 1:  # one shared row of ids for every query block
                block_index, block_count = block_index.expand(-1, -1, nqb, -1), block_count.expand(-1, -1, nqb)
            return block_sparse_attention(q, k, v, block_index, block_count, scale=scale, block_size=block_size,
                                          return_lse=True, check_ids=False)
        if sparse:
            split = split_index(block_index, block_count, nkb, splits, q.device)
        else:  # the dense split layout depends on sizes only: build it once
            key = (nkb, splits, q.device)
            if key not in _DENSE_SPLITS:
                _DENSE_SPLITS[key] = split_index(None, None, nkb, splits, q.device)
            split = _DENSE_SPLITS[key]
    index, count, splits = split
    # Split s is query block s of one call: the (padded) query block repeated S times.
    q_rep = F.pad(q, (0, 0, 0, block_size - nq)).repeat(1, 1, splits, 1)
    out, lse = block_sparse_attention(q_rep, k, v, index, count, scale=scale, block_size=block_size,
                                      return_lse=True, check_ids=False)
    out = out.view(bsz, hq, splits, block_size, d)[:, :, :, :nq].float()
    lse = lse.view(bsz, hq, splits, block_size)[:, :, :, :nq]
    top = lse.amax(dim=2, keepdim=True)
    top = torch.where(torch.isneginf(top), torch.zeros_like(top), top)
    weight = torch.exp(lse - top)  # splits that saw no key weigh 0
    total = weight.sum(dim=2)
    merged = (weight[..., None] * out).sum(dim=2) / total.clamp_min(torch.finfo(torch.float32).tiny)[..., None]
    merged_lse = torch.where(total > 0, top[:, :, 0] + torch.log(total), torch.full_like(total, float("-inf")))
    return merged.to(q.dtype), merged_lse
