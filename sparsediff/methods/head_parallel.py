"""Heads split over ranks (Ulysses context parallelism): what a method must agree on across them.

After Ulysses' all-to-all each rank holds every token of ``heads / n`` heads, so per-head work runs
unchanged. The one decision that spans heads is the global allocation's mass threshold (one budget over
all heads and query blocks): each rank gathers the candidate masses of the others, so the threshold, and
the kept blocks of every head, are those of a single GPU. Hosts set the group for the duration of a call:

    with head_group(group):           # a torch.distributed process group, or None
        out = method(q, k, v, ...)
"""

from __future__ import annotations

import contextlib
import contextvars

import torch

_GROUP: contextvars.ContextVar = contextvars.ContextVar("sparsediff_head_group", default=None)


@contextlib.contextmanager
def head_group(group):
    """Heads of the calls inside are this rank's share of the ``group``'s heads (None: all heads are local)."""
    token = _GROUP.set(group)
    try:
        yield
    finally:
        _GROUP.reset(token)


def current_group():
    return _GROUP.get()


def world_size() -> int:
    group = _GROUP.get()
    if group is None:
        return 1
    return torch.distributed.get_world_size(group)


def gather_last_dim(x: torch.Tensor) -> torch.Tensor:
    """``x`` of every rank of the current group concatenated along its last dim (rank order); ``x`` itself
    without a group. Ranks hold the same shapes (equal head shares)."""
    group = _GROUP.get()
    if group is None:
        return x
    parts = [torch.empty_like(x) for _ in range(torch.distributed.get_world_size(group))]
    torch.distributed.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=-1)
