"""Generic block-sparse attention: run any registered selector by name, then the block-sparse kernel.

``BlockSparseMethod(selector="xattention", sparsity=0.8)`` is how baselines are compared with BA-Att
under one interface; BA-Att's method subclasses it and adds norm sorting of keys.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import NamedTuple

import torch

from ..kernels import block_sparse_attention, index_to_mask, mask_to_index
from .base import AttentionMethod, MethodConfig, register_method
from .block_select import layout
from .selectors import available_selectors, get_selector


@dataclasses.dataclass
class BlockSparseConfig(MethodConfig):
    """Any registered selector + the block-sparse kernel.

    Budget: ``sparsity`` (share of visible key blocks skipped per query block; default 0.5) or
    ``mass`` (keep blocks until their estimated softmax mass reaches it); give at most one.
    """

    selector: str = "block_mean"
    sparsity: float | None = None
    mass: float | None = None
    keep_sinks: bool = True  # always keep the first key block (attention sink)
    keep_diagonal: bool = True  # always keep the key block aligned with the query block
    stride: int = 8  # anti-diagonal sampling stride of the "xattention" selector

    def __post_init__(self):
        super().__post_init__()
        if self.sparsity is not None and self.mass is not None:
            raise ValueError("give either sparsity (top-k budget) or mass (cumulative-mass threshold), not both")
        if self.mass is None and self.sparsity is None:
            self.sparsity = 0.5
        if self.sparsity is not None and not 0.0 <= float(self.sparsity) < 1.0:
            raise ValueError(f"sparsity must lie in [0, 1), got {self.sparsity!r}")
        if self.mass is not None and not 0.0 < float(self.mass) <= 1.0:
            raise ValueError(f"mass must lie in (0, 1], got {self.mass!r}")
        if not isinstance(self.selector, str) or self.selector not in available_selectors():
            raise ValueError(f"unknown selector {self.selector!r}; registered: {available_selectors()}")
        if not isinstance(self.stride, int) or self.stride < 1 or self.block_size % self.stride:
            raise ValueError(
                f"stride must be a positive int dividing block_size={self.block_size}, got {self.stride!r}"
            )


class SparsePlan(NamedTuple):
    """What a block-sparse method will compute: keys/values as the kernel sees them (possibly
    permuted), the kept blocks (ids refer to those keys) and the key permutation (None = identity)."""

    k: torch.Tensor
    v: torch.Tensor
    block_index: torch.Tensor
    block_count: torch.Tensor
    perm: torch.Tensor | None


@functools.lru_cache(maxsize=64)
def _accepted_kwargs(fn) -> frozenset:
    params = inspect.signature(fn).parameters.values()
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return frozenset({"scale", "global_tokens"})
    return frozenset(p.name for p in params if p.kind is p.KEYWORD_ONLY)


def run_selector(name, q, k, config, *, causal=False, scale=None, global_tokens=0):
    """Call a registered selector; selectors that do not take ``global_tokens`` get those blocks
    added afterwards (so any selector honours the contract)."""
    fn = get_selector(name)
    accepted = _accepted_kwargs(fn)
    kwargs = {"causal": causal}
    if "scale" in accepted:
        kwargs["scale"] = scale
    if "global_tokens" in accepted:
        kwargs["global_tokens"] = global_tokens
    index, count = fn(q, k, config, **kwargs)
    if global_tokens > 0 and "global_tokens" not in accepted:
        nq, nk, bs = q.shape[2], k.shape[2], config.block_size
        lay = layout(nq, nk, bs, q.device, causal=causal, keep_sinks=False, keep_diagonal=False,
                     global_tokens=global_tokens)
        mask = index_to_mask(index, count, lay.visible.shape[-1]) | lay.forced
        index, count = mask_to_index(mask, max_kept=lay.visible.shape[-1])
    return index, count


@register_method
class BlockSparseMethod(AttentionMethod):
    """Select blocks with ``config.selector``, then run the block-sparse kernel."""

    name = "block_sparse"
    config_class = BlockSparseConfig

    def prepare_kv(self, q, k, v, *, causal, frame_size, global_tokens):
        """Hook for methods that reorder keys before selection: ``(k, v, perm or None)``, optionally with a
        fourth item, block statistics of the returned ``k`` that :meth:`select` may reuse."""
        return k, v, None

    def select(self, q, k, *, causal, scale, global_tokens, k_stats=None):
        """``(block_index, block_count)`` for keys ``k`` as the kernel will see them."""
        return run_selector(self.config.selector, q, k, self.config, causal=causal, scale=scale,
                            global_tokens=global_tokens)

    def plan(self, q, k, v, *, causal=False, scale=None, frame_size=None, global_tokens=0) -> SparsePlan:
        prepared = self.prepare_kv(q, k, v, causal=causal, frame_size=frame_size, global_tokens=global_tokens)
        k, v, perm = prepared[:3]
        k_stats = prepared[3] if len(prepared) > 3 else None
        index, count = self.select(q, k, causal=causal, scale=scale, global_tokens=global_tokens, k_stats=k_stats)
        return SparsePlan(k, v, index, count, perm)

    def sparse_attention(self, q, k, v, *, causal, scale, layer, frame_size, global_tokens, return_lse):
        plan = self.plan(q, k, v, causal=causal, scale=scale, frame_size=frame_size, global_tokens=global_tokens)
        return block_sparse_attention(
            q, plan.k, plan.v, plan.block_index, plan.block_count, scale=scale, causal=causal,
            block_size=self.config.block_size, return_lse=return_lse, check_ids=False,
        )
