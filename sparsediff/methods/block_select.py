"""Turn block scores into the kernel's index form: the selection step every scoring selector shares.

A selector computes ``scores (B, Hq, nqb, nkb)`` (log-importance of each query-block / key-block pair);
:func:`select_from_scores` keeps, per head and query block, either a target share of the visible key
blocks (top-k, "density") or the smallest set whose softmax mass reaches ``mass``. Some blocks are
always kept ("forced": the first key block as attention sink, the diagonal block, blocks holding global
tokens, every block of a global query row) and count toward the budget. Under ``causal`` blocks wholly
in the future are never picked.

Everything that depends only on shapes (causal visibility, forced blocks, per-row budgets) is built on
the host once per shape and cached on the device, so the hot path issues no host syncs.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch

from ..kernels.block_sparse import triton_available
from ..kernels.block_topk import block_topk
from ..kernels.masks import causal_block_mask


class Layout(NamedTuple):
    visible: torch.Tensor  # (nqb, nkb) bool: key blocks a query block may see (all True unless causal)
    forced: torch.Tensor  # (nqb, nkb) bool: always kept (subset of visible)
    n_visible: torch.Tensor  # (nqb,) int64
    n_forced: torch.Tensor  # (nqb,) int64
    budget: torch.Tensor | None  # (nqb,) int64 blocks kept per row in top-k mode, None in mass mode
    max_kept: int  # width of block_index
    log_count: torch.Tensor  # (nkb,) float32 log of tokens per key block (ragged tail weighting)


def budget_of(config) -> tuple[float | None, float | None]:
    """(density, mass) from a config with ``sparsity`` / ``mass`` fields; exactly one is not None."""
    mass = getattr(config, "mass", None)
    if mass is not None:
        return None, float(mass)
    sparsity = getattr(config, "sparsity", None)
    return 1.0 - (0.5 if sparsity is None else float(sparsity)), None


def diagonal_blocks(nq: int, nk: int, block_size: int) -> torch.Tensor:
    """(nqb, nkb) bool: key blocks holding the keys aligned with each query block's first and last
    query (end-aligned: query ``i`` sits at key position ``i + nk - nq``)."""
    nqb, nkb = math.ceil(nq / block_size), math.ceil(nk / block_size)
    first = torch.arange(nqb) * block_size
    last = torch.clamp(first + block_size, max=nq) - 1
    mask = torch.zeros(nqb, nkb, dtype=torch.bool)
    for pos in (first, last):
        kb = torch.clamp((pos + nk - nq) // block_size, 0, nkb - 1)
        mask[torch.arange(nqb), kb] = True
    return mask


@functools.lru_cache(maxsize=128)
def _layout_cpu(nq, nk, block_size, causal, keep_sinks, keep_diagonal, global_tokens, density):
    nqb, nkb = math.ceil(nq / block_size), math.ceil(nk / block_size)
    visible = causal_block_mask(nqb, nkb, nq, nk, block_size) if causal else torch.ones(nqb, nkb, dtype=torch.bool)
    forced = torch.zeros(nqb, nkb, dtype=torch.bool)
    if keep_sinks:
        forced[:, 0] = True
    if keep_diagonal:
        forced |= diagonal_blocks(nq, nk, block_size)
    if global_tokens > 0:
        forced[:, : math.ceil(min(global_tokens, nk) / block_size)] = True  # global columns
        forced[: math.ceil(min(global_tokens, nq) / block_size)] = True  # global rows see everything
    forced &= visible
    n_visible = visible.sum(-1)
    n_forced = forced.sum(-1)
    counts = torch.full((nkb,), float(block_size))
    counts[-1] = nk - (nkb - 1) * block_size
    if density is None:
        budget, max_kept = None, nkb
    else:
        # A tiny epsilon keeps ceil from rounding 0.5 * 8 = 4.0000001 up to 5.
        want = torch.ceil(density * n_visible.double() - 1e-9).long().clamp(min=1)
        budget = torch.minimum(torch.maximum(want, n_forced), n_visible)
        max_kept = max(int(budget.max()), 1)
    return visible, forced, n_visible, n_forced, budget, max_kept, counts.log()


_device_layouts: dict = {}


def layout(nq, nk, block_size, device, *, causal=False, keep_sinks=True, keep_diagonal=True, global_tokens=0,
           density=None) -> Layout:
    """Shape-only selection tensors, built on the host and cached per device."""
    key = (nq, nk, block_size, bool(causal), bool(keep_sinks), bool(keep_diagonal), int(global_tokens),
           None if density is None else float(density))
    dev_key = (*key, str(device))
    if dev_key not in _device_layouts:
        if len(_device_layouts) > 256:
            _device_layouts.clear()
        parts = _layout_cpu(*key)
        _device_layouts[dev_key] = Layout(
            *(p.to(device) if isinstance(p, torch.Tensor) else p for p in parts)
        )
    return _device_layouts[dev_key]


def select_from_scores(scores, *, nq, nk, block_size, density=None, mass=None, causal=False, keep_sinks=True,
                       keep_diagonal=True, global_tokens=0, extra_forced=None, weight_by_count=True, backend=None):
    """``scores (B, H, nqb, nkb)`` -> ``(block_index int32 (B, H, nqb, max_kept), block_count int32 (B, H, nqb))``.

    Exactly one of ``density`` (share of visible key blocks kept per query block, top-k) and ``mass``
    (keep blocks in decreasing order until their softmax mass reaches it) is given. Scores are
    softmax logits; with ``weight_by_count`` each key block's logit gains ``log(tokens in block)`` so a
    ragged tail block is not over-weighted. ``extra_forced (nqb, nkb)`` adds selector-specific
    always-kept blocks. Kept ids are ascending in the first ``block_count`` slots, padding is 0.
    ``backend``: None (Triton for density budgets on CUDA), ``"torch"`` or ``"triton"``; both give the same
    blocks (ties in score may resolve differently).
    """
    if backend not in (None, "torch", "triton"):
        raise ValueError(f"backend must be None, 'torch' or 'triton', got {backend!r}")
    if (density is None) == (mass is None):
        raise ValueError("select_from_scores needs exactly one of density and mass")
    lay = layout(nq, nk, block_size, scores.device, causal=causal, keep_sinks=keep_sinks,
                 keep_diagonal=keep_diagonal, global_tokens=global_tokens, density=density)
    forced, n_forced, max_kept = lay.forced, lay.n_forced, lay.max_kept
    if extra_forced is not None:
        forced = forced | (extra_forced.to(scores.device) & lay.visible)
        n_forced = forced.sum(-1)
        if density is not None:
            max_kept = lay.visible.shape[-1]  # the budget may grow past the cached width
    if density is not None and (backend == "triton" or (backend is None and scores.is_cuda and triton_available())):
        # One program per row (radix-select top-k + ascending ids) instead of ~15 whole-tensor ops.
        return block_topk(scores, lay.visible, forced, lay.budget, max_kept,
                          lay.log_count if weight_by_count else None)
    logits = scores.float()
    if weight_by_count:
        logits = logits + lay.log_count
    logits = logits.masked_fill(~lay.visible, float("-inf"))
    priority = logits.masked_fill(forced, float("inf"))
    # One sort per row gives the ranking for both budgets (faster on GPU than a wide topk + re-sort).
    order = torch.sort(priority, dim=-1, descending=True).indices
    if density is not None:
        count = torch.minimum(torch.maximum(lay.budget, n_forced), lay.n_visible).expand(scores.shape[:-1])
    else:
        probs = torch.softmax(logits, dim=-1).nan_to_num(0.0)  # rows with nothing visible: all-zero
        p_sorted = probs.gather(-1, order)
        # Keep the shortest prefix whose mass reaches `mass`; forced blocks sort first.
        before = torch.cumsum(p_sorted, dim=-1) - p_sorted
        # mass >= 1 means "everything visible": float cumsums can reach 1 before the last block.
        count = (before < mass).sum(-1) if mass < 1.0 else lay.n_visible.expand(scores.shape[:-1])
        count = torch.minimum(torch.maximum(count, n_forced), lay.n_visible)
    nkb = scores.shape[-1]
    rank = torch.arange(nkb, device=scores.device)
    # Kept mask in key order, then each kept id goes to slot (number of kept ids before it): ascending.
    keep = torch.zeros_like(order, dtype=torch.bool).scatter_(-1, order, rank < count[..., None])
    slot = torch.where(keep, keep.cumsum(-1) - 1, max_kept)
    index = torch.zeros(*order.shape[:-1], max_kept + 1, dtype=torch.int32, device=scores.device)
    index.scatter_(-1, slot, rank.to(torch.int32).expand_as(order))
    index = index[..., :max_kept]
    return index.to(torch.int32).contiguous(), count.to(torch.int32).contiguous()
