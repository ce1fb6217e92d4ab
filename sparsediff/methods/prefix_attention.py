"""Attention of one short block of queries to a long prefix, split over key chunks (flash-decoding).

In block diffusion the active block has 32-128 queries and the prefix up to 128k+ keys. The
block-sparse kernel runs one program per (query block, head): with a single query block that is
only B * H programs, too few to fill a GPU, each walking the whole prefix. Here the key blocks are
cut into ``splits`` chunks and the query block is read once per chunk (as extra query blocks of
one kernel call, each with its chunk's block ids), so ``splits`` times more programs each read a
share of the prefix; the partial results merge exactly by their LSE. FlashBlock and LoSA use it for
their prefix attention; it also takes a block mask (sparse prefix attention).
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from ..kernels import block_sparse_attention
from ..kernels.merge.prefix import merge_prefix
from ..runtime.split_kv import choose_splits
from .dense import dense_attention


@functools.lru_cache(maxsize=256)
def _uniform_layout(kept: int, splits: int, num_kv_blocks: int, device: str, dense: bool):
    """Shape-only parts of a layout, built once: the dense ids, or the per-split counts of ``kept``."""
    chunk = math.ceil(kept / splits)
    splits = math.ceil(kept / chunk)
    count = torch.tensor([min(chunk, kept - s * chunk) for s in range(splits)], dtype=torch.int32, device=device)
    index = None
    if dense:
        index = F.pad(torch.arange(num_kv_blocks, dtype=torch.int32, device=device), (0, splits * chunk - kept))
        index = index.view(1, 1, splits, chunk)
    return index, count.view(1, 1, splits), chunk, splits


def split_index(block_index, block_count, num_kv_blocks: int, splits: int, device):
    """Kept key blocks laid out as ``splits`` query blocks: ``(index, count, splits)`` with ``index``
    ``(B' or 1, H' or 1, splits, chunk)``. Split ``s`` takes the kept ids at positions
    ``[s * chunk, (s + 1) * chunk)`` of each row, so the splits share the kept blocks evenly and the
    layout is one pad of ``block_index`` (no mask round trip, no device sync).

    ``block_index=None``: every key block. ``block_count`` may be an int: every row keeps that many
    (the shape-only counts are then cached)."""
    if block_index is None:
        index, count, _, splits = _uniform_layout(num_kv_blocks, splits, num_kv_blocks, str(device), True)
        return index, count, splits
    kept = block_index.shape[-1]
    if isinstance(block_count, int):
        _, count, chunk, splits = _uniform_layout(kept, min(splits, kept), num_kv_blocks, str(device), False)
    else:
        chunk = math.ceil(kept / min(splits, kept))
        splits = math.ceil(kept / chunk)
        start = torch.arange(splits, device=device, dtype=torch.int32) * chunk
        count = (block_count[..., :1] - start).clamp(0, chunk).to(torch.int32)
    index = block_index[..., 0, :]
    if splits * chunk != kept:
        index = F.pad(index, (0, splits * chunk - kept))
    index = index.view(*index.shape[:2], splits, chunk)
    return index, count.expand(*index.shape[:3]), splits


class Partials(NamedTuple):
    """Split prefix attention before its merge: ``out (B, Hq / pack, S, R, D)``, ``lse (B, Hq / pack, S, R)``.
    With ``pack > 1`` the query heads of a KV group were stacked into one query block: rows
    ``[j * Nq, (j + 1) * Nq)`` of packed head ``p`` belong to query head ``p * pack + j``. With ``rank``
    ``(B, Nq)`` (int64) the stacking is token-major instead: row ``rank[b, t] * pack + j`` holds token ``t``
    of query head ``p * pack + j`` (:func:`active_first_partials`)."""

    out: torch.Tensor
    lse: torch.Tensor
    pack: int = 1
    rank: torch.Tensor | None = None


def pack_factor(num_heads: int, num_kv_heads: int, nq: int, block_size: int, index_heads: int | None) -> int:
    """How many query heads of one KV group share a query block. A block of ``Nq < block_size`` queries
    leaves most of a tile's rows padding; stacking the group's heads fills them, so each program does
    ``pack`` heads' work on one read of its K/V blocks. Needs one block index for the packed heads:
    ``index_heads`` (the index's head dim) must be None (dense), 1 or ``num_kv_heads``."""
    group = num_heads // num_kv_heads
    if group == 1 or nq * 2 > block_size or index_heads not in (None, 1, num_kv_heads):
        return 1
    pack = min(group, block_size // nq)
    while group % pack:
        pack -= 1
    return pack


def prefix_partials(q, k, v, block_index=None, block_count=None, *, scale=None, block_size=128, splits=None,
                    split=None) -> Partials:
    """The split prefix attention before its merge (a :class:`Partials`), rows ``< Nq`` valid, to be
    finished by ``kernels.prefix_merge.merge_prefix(..., pack=parts.pack)`` (one launch that can also fold
    in a residual, a row cache and the in-block attention). Arguments as :func:`prefix_attention`; without
    splitting ``S = 1`` and ``R = Nq``. Split calls stack the query heads of a KV group into one query
    block (:func:`pack_factor`) when the block index is shared by them."""
    bsz, hq, nq, d = q.shape
    nkb = math.ceil(k.shape[2] / block_size)
    sparse = block_index is not None
    if split is None:
        kept = block_index.shape[-1] if sparse else nkb
        if splits is None:
            pack = pack_factor(hq, k.shape[1], nq, block_size, block_index.shape[1] if sparse else None)
            splits = choose_splits(q, kept, heads=hq // pack)
        splits = max(1, min(int(splits), kept))
        if nq > block_size or splits == 1:
            if not sparse:
                out, lse = dense_attention(q, k, v, scale=scale, return_lse=True)
            else:
                if block_index.shape[1] not in (1, hq):  # one index per KV head -> per query head
                    block_index = block_index.repeat_interleave(hq // block_index.shape[1], dim=1)
                    block_count = block_count.repeat_interleave(hq // block_count.shape[1], dim=1)
                nqb = math.ceil(nq / block_size)
                if block_index.shape[2] == 1 and nqb > 1:  # one shared row of ids for every query block
                    block_index, block_count = block_index.expand(-1, -1, nqb, -1), block_count.expand(-1, -1, nqb)
                out, lse = block_sparse_attention(q, k, v, block_index, block_count, scale=scale,
                                                  block_size=block_size, return_lse=True, check_ids=False)
            return Partials(out[:, :, None], lse[:, :, None])
        split = split_index(block_index, block_count, nkb, splits, q.device)
    index, count, splits = split
    pack = pack_factor(hq, k.shape[1], nq, block_size, index.shape[1])
    heads, rows = hq // pack, pack * nq
    if pack > 1:
        q = q.reshape(bsz, heads, rows, d)
    if index.shape[1] not in (1, heads):  # one index per KV head -> per (packed) query head
        index = index.repeat_interleave(heads // index.shape[1], dim=1)
        count = count.repeat_interleave(heads // count.shape[1], dim=1)
    # Split s is query block s of one call: the (padded) query block read S times (no copy: repeat_q).
    q_pad = F.pad(q, (0, 0, 0, block_size - rows)) if rows < block_size else q
    out, lse = block_sparse_attention(q_pad, k, v, index, count, scale=scale, block_size=block_size,
                                      return_lse=True, check_ids=False, repeat_q=splits)
    return Partials(out.view(bsz, heads, splits, block_size, d), lse.view(bsz, heads, splits, block_size), pack)


class ActiveRows(NamedTuple):
    """A block's query rows ordered active-first, each KV group's query heads stacked token-major:
    ``stacked`` ``(B, Hkv, nqb * block_size, D)`` (zero-padded), row ``rank[b, t] * group + j`` holding token
    ``t`` of the group's query head ``j``; ``n_rows`` ``(B,)`` int32 = active tokens * group (the leading rows)."""

    stacked: torch.Tensor
    rank: torch.Tensor
    n_rows: torch.Tensor
    group: int


def active_first_rows(q, active, num_kv_heads: int, block_size: int) -> ActiveRows:
    """:class:`ActiveRows` of q ``(B, Hq, Nq, D)`` for the bool mask ``active`` ``(B, Nq)``, at a fixed shape."""
    bsz, hq, nq, d = q.shape
    group = hq // num_kv_heads
    # Stable descending sort of the mask: active tokens first, each group in token order.
    order = torch.sort(active.to(torch.uint8), dim=1, descending=True, stable=True).indices
    rank = torch.empty_like(order).scatter_(1, order, _positions(bsz, nq, q.device))
    rows = nq * group
    nqb = math.ceil(rows / block_size)
    # One gather straight into the token-major layout (B, Hkv, Nq, G, D): row r * G + j is head j of token r.
    by_token = q.reshape(bsz, num_kv_heads, group, nq, d).transpose(2, 3)
    index = order[:, None, :, None, None].expand(-1, num_kv_heads, -1, group, d)
    stacked = by_token.gather(2, index).view(bsz, num_kv_heads, rows, d)
    if nqb * block_size != rows:
        stacked = F.pad(stacked, (0, 0, 0, nqb * block_size - rows))
    return ActiveRows(stacked, rank, active.sum(dim=1, dtype=torch.int32) * group, group)


def active_first_partials(q, k, v, split, active, *, scale=None, block_size=128, rows=None) -> Partials:
    """Split prefix attention that computes only the ``active`` tokens' rows (``(B, Nq)`` bool), at a
    fixed shape (CUDA-graph safe). The tokens are ordered active-first on the device and each KV group's
    query heads stacked token-major (:func:`active_first_rows`, or ``rows`` when already made): the active
    rows fill the leading query tiles, and the kernels skip the tiles past them (``live_rows``). Needs one
    block index per KV head (or one for all): ``split = (index, count, S)`` as :func:`split_index` lays it
    out, or with each split's row already repeated for the ``nqb`` query tiles (``S * nqb`` rows). Rows of
    inactive tokens are left as zeros / -inf or computed, whichever their tile (or 64-row half of it, on the
    Gluon kernel) is."""
    bsz, hq, nq, d = q.shape
    hkv = k.shape[1]
    index, count, splits = split
    if index.shape[1] not in (1, hkv):
        raise ValueError(f"active-first prefix attention needs one block index per KV head, got {index.shape[1]} "
                         f"index heads for {hkv} KV heads")
    if rows is None:
        rows = active_first_rows(q, active, hkv, block_size)
    stacked = rows.stacked
    nqb = stacked.shape[2] // block_size
    # Query block s * nqb + t is tile t of the stacked rows against split s: rows of ids and counts per split
    # are repeated per tile, unless they come laid out so (S * nqb rows, e.g. rank_blocks(repeat=nqb)).
    if nqb > 1 and index.shape[2] == splits:
        index = index.repeat_interleave(nqb, dim=2)
    if nqb > 1 and count.shape[-1] == splits:
        count = count.repeat_interleave(nqb, dim=-1)
    # The kernels skip the tiles past the active rows themselves (live_rows, read on the device).
    out, lse = block_sparse_attention(stacked, k, v, index.expand(bsz, -1, -1, -1), count.expand(bsz, -1, -1),
                                      scale=scale, block_size=block_size, return_lse=True, check_ids=False,
                                      repeat_q=splits, live_rows=rows.n_rows)
    r = nqb * block_size
    return Partials(out.view(bsz, hkv, splits, r, d), lse.view(bsz, hkv, splits, r), rows.group, rows.rank)


@functools.lru_cache(maxsize=64)
def _positions(bsz: int, n: int, device) -> torch.Tensor:
    return torch.arange(n, device=device).expand(bsz, n)


def prefix_attention(q, k, v, block_index=None, block_count=None, *, scale=None, block_size=128, splits=None,
                     split=None):
    """``(out, lse)`` of q ``(B, Hq, Nq, D)`` against k, v ``(B, Hkv, Nk, D)``, dense or over the kept
    key blocks ``block_index / block_count`` (one query block: ``(B or 1, Hq or Hkv or 1, 1, max_kept)``;
    an index per KV head is shared by the group's query heads).

    ``splits=None`` picks a split count for the GPU (1 on CPU); queries longer than one block run as
    a plain kernel call. ``split``: a precomputed :func:`split_index` result (callers that reuse one
    selection for many steps), which then replaces ``block_index`` and ``splits``.
    """
    out, lse, pack, _ = prefix_partials(q, k, v, block_index, block_count, scale=scale, block_size=block_size,
                                        splits=splits, split=split)
    if out.shape[2] == 1 and pack == 1:
        return out[:, :, 0], lse[:, :, 0]
    return merge_prefix(out, lse, q.shape[2], out_dtype=q.dtype, pack=pack)


def kv_capacity(k) -> tuple:
    """``(rows, view)``: when ``k (B, H, N, D)`` is the leading rows of a ``(B, H, C, D)`` buffer (a
    preallocated KV cache), ``C`` and a view of all ``C`` rows at the same address; else ``(N, k)``.
    Graphs captured on the full view stay valid while the cache fills up; rows past ``N`` are never read."""
    b, h, n, d = k.shape
    s = k.stride()
    if s[3] != 1 or s[2] != d:
        return n, k
    total = k.untyped_storage().nbytes() // k.element_size() - k.storage_offset()
    cap = s[1] // d if h > 1 else (s[0] // d if b > 1 else total // d)
    if cap <= n or (b > 1 and h > 1 and s[0] < h * s[1]):
        return n, k
    if (b - 1) * s[0] + (h - 1) * s[1] + cap * d > total:
        return n, k
    return cap, k.as_strided((b, h, cap, d), s)


def strided_layout(index, splits: int):
    """Ranked block ids ``(B, H, 1, K)`` as ``splits`` query blocks ``(B, H, splits, ceil(K / splits))``:
    split ``s`` takes ranks ``s, s + splits, ...`` so that the first ``keep`` ranks (``strided_counts``)
    spread evenly over the splits whatever ``keep`` is. One pad and one copy (the CPU path gathers by view)."""
    kept = index.shape[-1]
    chunk = math.ceil(kept / splits)
    if splits * chunk != kept:
        index = F.pad(index, (0, splits * chunk - kept))
    return index.view(*index.shape[:2], chunk, splits).transpose(-1, -2).contiguous()


def strided_counts(keep: int, splits: int, out):
    """Per-split counts of :func:`strided_layout` for the first ``keep`` ranks, written into ``out``
    ``(1, 1, splits)`` int32 on the device (no host-device copy)."""
    ranks = torch.arange(splits, device=out.device, dtype=torch.int32)
    out.copy_(torch.sub(keep + splits - 1, ranks).div_(splits, rounding_mode="floor").clamp_(min=0).view_as(out))
    return out
