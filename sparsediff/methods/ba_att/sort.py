"""BA-Att's key reordering: keys and values sorted by L2 norm inside segments (frames or the sequence)."""

from __future__ import annotations

import math

import torch

from ...kernels.block_stats.permute import gather_rows_with_stats, gather_sorted_segments, row_norms
from . import segment_sort
from .features import segment_order
from .scores import _triton_path


def sort_keys(k, v, *, segment=None, start=0):
    """Reorder keys and values by key L2 norm (descending) inside consecutive segments of ``segment``
    tokens (None: one segment), leaving the first ``start`` tokens (global tokens) in place.

    Returns ``(k_sorted, v_sorted, perm)`` with ``perm (B, Hkv, Nk)`` int64: ``k_sorted[..., i, :] =
    k[..., perm[i], :]``.
    """
    return _sort_keys(k, v, segment=segment, start=start)[:3]


def _sort_keys(k, v, *, segment=None, start=0, block_size=None, backend=None, query=None):
    """:func:`sort_keys` plus the sorted keys' block statistics (None without ``block_size`` or when
    nothing moves). On the Triton path (CUDA) they are the key-side score features ``(B, H, nb, 3D)``
    from the gather kernel, and the sort runs with no torch ops: segments up to
    ``segment_sort.MAX_FUSED_SEGMENT`` tokens take norms + sorted runs in one launch (and a merge launch past
    ``segment_sort.RUN_ROWS``), longer ones the norm kernel and a sort; then the gather. Elsewhere a
    :class:`BlockStats`.

    ``query=(q, scale, c)`` (the plan's path) returns a fifth item: the query features
    ``query_features(q, block_size, scale, c)`` when the sort's launch computed them, else None."""
    res = _sort_keys_impl(k, v, segment=segment, start=start, block_size=block_size, backend=backend, query=query)
    return res if query is not None else res[:4]


def _sort_keys_impl(k, v, *, segment, start, block_size, backend, query):
    bsz, h, n, d = k.shape
    body = n - start
    if body <= 1:
        return k, v, None, None, None
    seg = body if segment is None else min(int(segment), body)
    nseg = math.ceil(body / seg)
    if block_size is not None and v.shape == k.shape and _triton_path(k, block_size, backend):
        if seg <= segment_sort.MAX_FUSED_SEGMENT:
            if query is None:
                order, left = segment_sort.norm_segment_order(k[:, :, start:], seg), None
            else:
                q, scale, c = query
                order, left = segment_sort.norm_segment_order(k[:, :, start:], seg, q=q, block_size=block_size,
                                                              scale=scale, c=c)
            return (*gather_sorted_segments(k, v, order, seg, start, block_size), left)
        norms = row_norms(k[:, :, start:], backend="triton", pad_to=nseg * seg)
        order = segment_order(norms, seg)
        if order is None:  # long segments: torch's segmented sort is faster than a bitonic tl.sort
            order = norms.view(bsz, h, nseg, seg).argsort(dim=-1, descending=True).view(bsz, h, nseg * seg)
        return (*gather_sorted_segments(k, v, order, seg, start, block_size), None)
    norms = row_norms(k[:, :, start:])
    if nseg * seg != body:
        # Padding sorts last, and only the last segment is padded, so the first `body` entries are real.
        norms = torch.nn.functional.pad(norms, (0, nseg * seg - body), value=-1.0)
    order = norms.view(bsz, h, nseg, seg).argsort(dim=-1, descending=True)
    if nseg > 1:
        order = order + torch.arange(0, nseg * seg, seg, device=k.device)[:, None]
    perm = order.view(bsz, h, nseg * seg)
    if nseg * seg != body:
        perm = perm[..., :body]
    if start:
        perm = torch.nn.functional.pad(perm + start, (start, 0))
        perm[..., :start] = torch.arange(start, device=k.device)
    k_sorted, v_sorted, stats = gather_rows_with_stats(
        k, v, perm, block_size or 128, with_stats=block_size is not None)
    return k_sorted, v_sorted, perm, stats, None


