"""Turn block scores into the kernel's index form: the selection step every scoring selector shares.

A selector computes ``scores (B, H, nqb, nkb)`` (log-importance of each query-block / key-block pair);
:func:`select_from_scores` decides how many key blocks each query block keeps and which:

- ``density`` with ``allocation="row"``: every query block keeps the same share of its visible key
  blocks (top-k per row);
- ``density`` with ``allocation="global"``: one threshold on the estimated block mass (softmax of the
  scores per row) for all heads and query blocks of a batch element, set so that the mean density is the
  target: the kept blocks are those holding the most mass anywhere in the call, which maximises the mass
  kept summed over rows. A head whose attention sits on a few blocks keeps those at little cost; a head that
  spreads its mass evenly keeps fewer blocks than a per-row budget would give it (its output is an average
  over many values, which dropping a part of moves less). On SmolLM2 this beat an equal-recall rule (top-p
  with one threshold) and the per-row budget (docs/ba_att.md);
- ``mass``: each query block keeps the smallest set whose estimated mass reaches it (top-p);
- both: the larger of the two sets (the hybrid top-k + top-p).

Some blocks are always kept and count toward the budget ("forced"): the first key block (attention sink),
the key blocks within ``local_window`` tokens of the query block's own positions (at 0: only the diagonal
block), blocks holding global tokens and every block of a global query row. Under ``causal`` blocks wholly
in the future are never picked. Densities are shares of the *visible* key blocks.

Everything that depends only on shapes (causal visibility, forced blocks, budgets) is built on the host once
per shape and cached on the device, so the hot path issues no host syncs.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch

from ..kernels.backend import choose_backend
from ..kernels.block_topk import block_topk
from ..kernels.masks import causal_block_mask
from . import head_parallel

ALLOCATIONS = ("row", "global")


class Layout(NamedTuple):
    visible: torch.Tensor  # (nqb, nkb) bool: key blocks a query block may see (all True unless causal)
    forced: torch.Tensor  # (nqb, nkb) bool: always kept (subset of visible)
    n_visible: torch.Tensor  # (nqb,) int64
    n_forced: torch.Tensor  # (nqb,) int64
    budget: torch.Tensor | None  # (nqb,) or per head (H, nqb) int64 blocks per row (top-k), None without density
    max_kept: int  # width of block_index
    log_count: torch.Tensor  # (nkb,) float32 log of tokens per key block (ragged tail weighting)
    total: int  # blocks a (batch element) may keep over all heads and rows at the density (global allocation)
    visible_pairs: int  # visible (query block, key block) pairs of one head, counted on the host
    forced_pairs: int  # forced pairs of one head, counted on the host


def budget_of(config, layer=None) -> tuple[float | tuple | None, float | None]:
    """``(density, mass)`` from a config's ``sparsity`` / ``mass`` fields (at least one is not None; both for
    the hybrid). A calibration table on the config (``config.budgets``) gives ``layer`` its own density, a
    float or a tuple with one density per head."""
    mass = getattr(config, "mass", None)
    sparsity = getattr(config, "sparsity", None)
    density = None if sparsity is None else 1.0 - float(sparsity)
    table = getattr(config, "budgets", None)
    if table is not None and layer is not None and density is not None:
        density = table.density(layer, default=density, heads=getattr(config, "allocation", "row") == "row")
        if isinstance(density, tuple) and head_parallel.world_size() > 1:
            raise NotImplementedError(f"{layer}: per-head densities of a budget table need every head on one rank; "
                                      "under Ulysses context parallelism drop the table's 'heads' entries or "
                                      "use allocation='global'")
    if density is None and mass is None:
        density = 0.5
    return density, None if mass is None else float(mass)


def policy_of(config) -> dict:
    """The shape and spread settings of a config, as keyword arguments of :func:`select_from_scores`."""
    window = getattr(config, "local_window", 0)
    return dict(block_size=config.block_size, keep_sinks=getattr(config, "keep_sinks", True),
                keep_diagonal=getattr(config, "keep_diagonal", True),
                allocation=getattr(config, "allocation", "row"),
                local_window=config.block_size if window is None else window)


def _window_blocks(nq, nk, block_size, window):
    """(nqb, nkb) bool: key blocks holding a key within ``window`` positions of a query of the block
    (end-aligned: query ``i`` sits at key position ``i + nk - nq``); window 0 is the diagonal block."""
    nqb, nkb = math.ceil(nq / block_size), math.ceil(nk / block_size)
    first = torch.arange(nqb) * block_size + nk - nq
    last = torch.clamp(torch.arange(1, nqb + 1) * block_size, max=nq) - 1 + nk - nq
    lo = torch.clamp(first - window, 0, nk - 1) // block_size
    hi = torch.clamp(last + window, 0, nk - 1) // block_size
    cols = torch.arange(nkb)
    return (cols[None, :] >= lo[:, None]) & (cols[None, :] <= hi[:, None])


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
def _layout_cpu(nq, nk, block_size, causal, keep_sinks, keep_diagonal, global_tokens, density, window):
    nqb, nkb = math.ceil(nq / block_size), math.ceil(nk / block_size)
    visible = causal_block_mask(nqb, nkb, nq, nk, block_size) if causal else torch.ones(nqb, nkb, dtype=torch.bool)
    forced = torch.zeros(nqb, nkb, dtype=torch.bool)
    if keep_sinks:
        forced[:, 0] = True
    if keep_diagonal:
        forced |= diagonal_blocks(nq, nk, block_size)
    if window:
        forced |= _window_blocks(nq, nk, block_size, window)
    if global_tokens > 0:
        forced[:, : math.ceil(min(global_tokens, nk) / block_size)] = True  # global columns
        forced[: math.ceil(min(global_tokens, nq) / block_size)] = True  # global rows see everything
    forced &= visible
    n_visible = visible.sum(-1)
    n_forced = forced.sum(-1)
    counts = torch.full((nkb,), float(block_size))
    counts[-1] = nk - (nkb - 1) * block_size
    if density is None:
        budget, max_kept, total = None, nkb, 0
    else:
        per_head = torch.tensor(density if isinstance(density, tuple) else (density,), dtype=torch.float64)
        # A tiny epsilon keeps ceil from rounding 0.5 * 8 = 4.0000001 up to 5.
        want = torch.ceil(per_head[:, None] * n_visible.double() - 1e-9).long().clamp(min=1)
        budget = torch.minimum(torch.maximum(want, n_forced), n_visible)
        max_kept = max(int(budget.max()), 1)
        budget = budget if isinstance(density, tuple) else budget[0]
        heads = len(per_head) if isinstance(density, tuple) else 1
        total = int(round(float(per_head.sum()) / heads * int(n_visible.sum()))) * heads
    return (visible, forced, n_visible, n_forced, budget, max_kept, counts.log(), total, int(n_visible.sum()),
            int(n_forced.sum()))


_device_layouts: dict = {}


def layout(nq, nk, block_size, device, *, causal=False, keep_sinks=True, keep_diagonal=True, global_tokens=0,
           density=None, local_window=0) -> Layout:
    """Shape-only selection tensors, built on the host and cached per device. ``density`` is a float or a
    tuple of per-head densities; ``total`` (global allocation) then counts every head of one batch element."""
    if isinstance(density, (tuple, list)):
        density = tuple(float(d) for d in density)
    elif density is not None:
        density = float(density)
    key = (nq, nk, block_size, bool(causal), bool(keep_sinks), bool(keep_diagonal), int(global_tokens),
           density, int(local_window))
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
                       keep_diagonal=True, global_tokens=0, extra_forced=None, weight_by_count=True, backend=None,
                       allocation="row", local_window=0):
    """``scores (B, H, nqb, nkb)`` -> ``(block_index int32 (B, H, nqb, max_kept), block_count int32 (B, H, nqb))``.

    ``density`` (a share of the visible key blocks; a tuple gives each head its own) and/or ``mass`` (top-p on
    the softmax of the scores per row); with both, a row keeps the larger set. ``allocation`` spreads a density
    budget: ``"row"`` (the same share per query block) or ``"global"`` (one mass threshold across heads and
    query blocks, mean density = the target; see the module docstring). Scores are softmax logits; with
    ``weight_by_count`` each key block's logit gains ``log(tokens in block)`` so a ragged tail block is not
    over-weighted. ``local_window`` (tokens) forces the key blocks near each query block's own positions;
    ``extra_forced (nqb, nkb)`` adds selector-specific always-kept blocks. Kept ids are ascending in the
    first ``block_count`` slots, padding is 0. ``backend``: None (the Triton top-k on CUDA), ``"torch"`` or
    ``"triton"``; both give the same blocks (ties in score may resolve differently).
    """
    backend = choose_backend(backend, scores, op="select_from_scores")
    if density is None and mass is None:
        raise ValueError("select_from_scores needs a density, a mass or both")
    if allocation not in ALLOCATIONS:
        raise ValueError(f"allocation must be one of {ALLOCATIONS}, got {allocation!r}")
    per_head = isinstance(density, (tuple, list))
    if per_head and len(density) != scores.shape[1]:
        raise ValueError(f"{len(density)} per-head densities for {scores.shape[1]} heads")
    lay = layout(nq, nk, block_size, scores.device, causal=causal, keep_sinks=keep_sinks,
                 keep_diagonal=keep_diagonal, global_tokens=global_tokens, density=density,
                 local_window=local_window)
    forced, n_forced, max_kept = lay.forced, lay.n_forced, lay.max_kept
    if extra_forced is not None:
        forced = forced | (extra_forced.to(scores.device) & lay.visible)
        n_forced = forced.sum(-1)
    logits = scores.float()
    if weight_by_count:
        logits = logits + lay.log_count
    logits = logits.masked_fill(~lay.visible, float("-inf"))
    # Blocks per row: None = the layout's shape-only budget, else a (B, H, nqb) tensor.
    count = None
    if mass is not None or (density is not None and allocation == "global"):
        probs = torch.softmax(logits, dim=-1).nan_to_num(0.0)  # rows with nothing visible: all-zero
        if density is not None and allocation == "global":
            count = _global_counts(probs, lay, forced, n_forced)
        elif density is not None:
            count = (lay.budget if lay.budget.dim() == 2 else lay.budget[None]).expand(scores.shape[:-1])
        if mass is not None:
            top_p = _mass_counts(probs, logits, forced, n_forced, lay, mass)
            count = top_p if count is None else torch.maximum(count, top_p)
        max_kept = lay.visible.shape[-1]
    elif extra_forced is not None or per_head:
        count = (lay.budget if per_head else lay.budget[None]).expand(scores.shape[:-1])
        if extra_forced is not None:
            count = torch.minimum(torch.maximum(count, n_forced), lay.n_visible)
            max_kept = lay.visible.shape[-1]  # the budget may grow past the cached width
    if backend == "triton":
        # One program per row (radix-select top-k + ascending ids) instead of ~15 whole-tensor ops.
        budget = lay.budget if count is None else count.to(torch.int32)
        return block_topk(scores, lay.visible, forced, budget, max_kept,
                          lay.log_count if weight_by_count else None)
    if count is None:
        count = lay.budget.expand(scores.shape[:-1])
    count = torch.minimum(torch.maximum(count, n_forced), lay.n_visible)
    if not scores.is_cuda:  # the PyTorch kernel gathers max_kept blocks per row: no wider than needed
        max_kept = min(max_kept, max(int(count.max()), 1))
    priority = logits.masked_fill(forced, float("inf"))
    order = torch.sort(priority, dim=-1, descending=True).indices
    nkb = scores.shape[-1]
    rank = torch.arange(nkb, device=scores.device)
    # Kept mask in key order, then each kept id goes to slot (number of kept ids before it): ascending.
    keep = torch.zeros_like(order, dtype=torch.bool).scatter_(-1, order, rank < count[..., None])
    slot = torch.where(keep, keep.cumsum(-1) - 1, max_kept)
    index = torch.zeros(*order.shape[:-1], max_kept + 1, dtype=torch.int32, device=scores.device)
    index.scatter_(-1, slot, rank.to(torch.int32).expand_as(order))
    index = index[..., :max_kept]
    return index.to(torch.int32).contiguous(), count.to(torch.int32).contiguous()


def _global_counts(probs, lay, forced, n_forced):
    """Blocks per row under one mass threshold per batch element, set so the kept blocks (forced ones
    included) number ``lay.total``: the free (visible, not forced) blocks of all heads and rows compete."""
    bsz, heads = probs.shape[:2]
    free = lay.visible & ~forced
    # Host-side counts (no device sync) unless a selector added forced blocks of its own.
    n_forced_pairs = lay.forced_pairs if forced is lay.forced else int(n_forced.sum())
    n_free = (lay.visible_pairs - n_forced_pairs) * heads
    budget = lay.total * (heads if lay.budget is not None and lay.budget.dim() == 1 else 1)
    want = budget - n_forced_pairs * heads
    if want >= n_free:
        return (n_forced + free.sum(-1)).expand(probs.shape[:-1])
    if want <= 0:
        return n_forced.expand(probs.shape[:-1])
    vals = probs.masked_fill(~free, -1.0).reshape(bsz, -1)
    # Heads split over ranks (Ulysses): the threshold over every rank's heads, as on one GPU.
    ranks = head_parallel.world_size()
    threshold = mass_threshold(head_parallel.gather_last_dim(vals), want * ranks).view(bsz, 1, 1, 1)
    # Blocks with no estimated mass at all are never worth their cost, even under the budget.
    kept = free & (probs >= threshold) & (probs > 0)
    return n_forced + kept.sum(-1)


def mass_threshold(vals: torch.Tensor, want: int) -> torch.Tensor:
    """Per row of ``vals (B, M)`` (block masses; negative = not a candidate) the ``want``-th largest value, so
    that ``want`` entries are ``>= t`` (ties aside). ``want`` is a host int, so neither path syncs: a partial
    selection on CPU, a full sort on CUDA (measured on an H100 at 64k tokens: 0.29 ms for the sort against
    24 ms for ``kthvalue`` and 8.7 ms for a two-level histogram; ``benchmarks/bench_selection.py``)."""
    if vals.is_cuda:
        return vals.sort(dim=-1, descending=True).values[:, want - 1]
    return vals.kthvalue(vals.shape[-1] - want + 1, dim=-1).values


def _mass_counts(probs, logits, forced, n_forced, lay, mass):
    """Blocks per row for top-p: the shortest prefix (forced blocks first, then by score) reaching ``mass``."""
    if mass >= 1.0:  # "everything visible": float cumsums can reach 1 before the last block
        return lay.n_visible.expand(probs.shape[:-1])
    order = torch.sort(logits.masked_fill(forced, float("inf")), dim=-1, descending=True).indices
    p_sorted = probs.gather(-1, order)
    before = torch.cumsum(p_sorted, dim=-1) - p_sorted
    return torch.maximum((before < mass).sum(-1), n_forced)
