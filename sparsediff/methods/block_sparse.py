"""Generic block-sparse attention: run any registered selector by name, then the block-sparse kernel.

``BlockSparseMethod(selector="xattention", sparsity=0.8)`` is how baselines are compared with BA-Att
under one interface; BA-Att's method subclasses it and adds norm sorting of keys.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import logging

import torch

from .._logging import warn_once
from ..kernels import block_sparse_attention, index_to_mask, mask_to_index
from ..kernels.block_sparse import eight_bit_unsupported
from .base import AttentionMethod, MethodConfig, register_method
from .block_select import ALLOCATIONS, layout
from .budgets import LayerBudgets
from .selectors import available_selectors, get_selector
from .sparse_plan import SparsePlan

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class BlockSparseConfig(MethodConfig):
    """Any registered selector + the block-sparse kernel.

    Budget: ``sparsity`` (share of the visible key blocks skipped; default 0.5) and/or ``mass`` (a query
    block keeps key blocks until their estimated softmax mass reaches it, top-p); with both, each query
    block keeps the larger of the two sets. ``allocation`` spreads a sparsity budget: ``"row"`` (every
    query block keeps the same share) or ``"global"`` (one threshold on the estimated block mass over the
    heads and query blocks of a call, so the mean density is the target; see ``methods/block_select.py``).
    ``local_window`` (tokens): key blocks within this distance of a query block's own positions are always
    kept (0: only the diagonal block). ``compensate``: every dropped visible key block still enters the
    softmax as one pooled term (weight log n + s·q·k̄, value v̄; ``kernels/dropped_blocks.py``).
    ``budgets``: per-layer densities from ``sparsediff calibrate`` (a path, a dict or a ``LayerBudgets``),
    replacing ``sparsity`` for the layers they name. ``fine_block_size``: calls with fewer than
    ``fine_below`` keys run with blocks of this size instead of ``block_size`` (more blocks per row where
    sequences are short; None: always ``block_size``).
    """

    selector: str = "block_mean"
    sparsity: float | None = None
    mass: float | None = None
    keep_sinks: bool = True  # always keep the first key block (attention sink)
    keep_diagonal: bool = True  # always keep the key block aligned with the query block
    stride: int = 8  # anti-diagonal sampling stride of the "xattention" selector
    allocation: str = "row"
    local_window: int | None = 0
    compensate: bool = False
    budgets: object = None
    fine_block_size: int | None = None
    fine_below: int = 8192

    def fine_overrides(self) -> dict:
        """Config fields the fine-block twin changes besides its block size (a method's own rule)."""
        return {}

    def __post_init__(self):
        super().__post_init__()
        fine = self.fine_block_size
        if fine is not None and (isinstance(fine, bool) or not isinstance(fine, int) or fine < 16 or fine & (fine - 1)):
            raise ValueError(f"fine_block_size must be None or a power of two >= 16, got {fine!r}")
        if isinstance(self.fine_below, bool) or not isinstance(self.fine_below, int) or self.fine_below < 0:
            raise ValueError(f"fine_below must be an int >= 0 (keys), got {self.fine_below!r}")
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
        if self.allocation not in ALLOCATIONS:
            raise ValueError(f"allocation must be one of {ALLOCATIONS}, got {self.allocation!r}")
        w = self.local_window
        if w is not None and (isinstance(w, bool) or not isinstance(w, int) or w < 0):
            raise ValueError(f"local_window must be None (one block) or an int >= 0 (tokens), got {w!r}")
        if not isinstance(self.compensate, bool):
            raise ValueError(f"compensate must be True or False, got {self.compensate!r}")
        if self.budgets is not None:
            self.budgets = LayerBudgets.load(self.budgets)

    @property
    def window(self) -> int:
        """``local_window`` in tokens (None: one block)."""
        return self.block_size if self.local_window is None else self.local_window

    def to_dict(self) -> dict:
        out = super().to_dict()
        if self.budgets is not None:
            out["budgets"] = self.budgets.source or repr(self.budgets)
        return out


@functools.lru_cache(maxsize=64)
def _accepted_kwargs(fn) -> frozenset:
    params = inspect.signature(fn).parameters.values()
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return frozenset({"scale", "global_tokens", "layer"})
    return frozenset(p.name for p in params if p.kind is p.KEYWORD_ONLY)


def run_selector(name, q, k, config, *, causal=False, scale=None, global_tokens=0, layer=None):
    """Call a registered selector; selectors that do not take ``global_tokens`` get those blocks
    added afterwards (so any selector honours the contract). ``layer`` reaches selectors that take it
    (per-layer budgets)."""
    fn = get_selector(name)
    accepted = _accepted_kwargs(fn)
    kwargs = {"causal": causal}
    for key, value in (("scale", scale), ("global_tokens", global_tokens), ("layer", layer)):
        if key in accepted:
            kwargs[key] = value
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
    eight_bit = True
    config_class = BlockSparseConfig

    def prepare_kv(self, q, k, v, *, causal, frame_size, global_tokens):
        """Hook for methods that reorder keys before selection: ``(k, v, perm or None)``, optionally with a
        fourth item, block statistics of the returned ``k`` that :meth:`select` may reuse."""
        return k, v, None

    def residual_planner(self, nk: int):
        """Residual reuse keeps this method's plan across steps when it computes its sparse product as plan +
        kernel (a subclass that overrides ``sparse_attention`` does not)."""
        if type(self).sparse_attention is BlockSparseMethod.sparse_attention:
            return self.for_keys(nk)
        return None

    def for_keys(self, nk: int) -> BlockSparseMethod:
        """The method that runs a call with ``nk`` keys: this one, or below ``fine_below`` keys its twin with
        blocks of ``fine_block_size`` (built once; it shares this method's stats, so reports cover both)."""
        cfg = self.config
        fine = cfg.fine_block_size
        if fine is None or fine >= cfg.block_size or nk >= cfg.fine_below:
            return self
        twin = getattr(self, "_fine_twin", None)
        if twin is None:
            twin = type(self)(dataclasses.replace(cfg, block_size=fine, fine_block_size=None, **cfg.fine_overrides()))
            self._fine_twin = twin
        twin.stats = self.stats
        return twin

    def select(self, q, k, *, causal, scale, global_tokens, k_stats=None, layer=None):
        """``(block_index, block_count)`` for keys ``k`` as the kernel will see them."""
        return run_selector(self.config.selector, q, k, self.config, causal=causal, scale=scale,
                            global_tokens=global_tokens, layer=layer)

    def plan(self, q, k, v, *, causal=False, scale=None, frame_size=None, global_tokens=0, layer=None) -> SparsePlan:
        method = self.for_keys(k.shape[2])
        if method is not self:
            return method.plan(q, k, v, causal=causal, scale=scale, frame_size=frame_size,
                               global_tokens=global_tokens, layer=layer)
        prepared = self.prepare_kv(q, k, v, causal=causal, frame_size=frame_size, global_tokens=global_tokens)
        k, v, perm = prepared[:3]
        k_stats = prepared[3] if len(prepared) > 3 else None
        index, count = self.select(q, k, causal=causal, scale=scale, global_tokens=global_tokens, k_stats=k_stats,
                                   layer=layer)
        return SparsePlan(k, v, index, count, perm, self.config.block_size)

    def sparse_attention(self, q, k, v, *, causal, scale, layer, frame_size, global_tokens, return_lse):
        method = self.for_keys(k.shape[2])
        if method is not self:
            return method.sparse_attention(q, k, v, causal=causal, scale=scale, layer=layer, frame_size=frame_size,
                                           global_tokens=global_tokens, return_lse=return_lse)
        plan = self.plan(q, k, v, causal=causal, scale=scale, frame_size=frame_size, global_tokens=global_tokens,
                         layer=layer)
        self._count_kept(plan.block_count, q, k, causal, layer)
        return self.attend(q, plan, causal=causal, scale=scale, return_lse=return_lse)

    def attend(self, q, plan: SparsePlan, *, causal, scale, return_lse, compensate=None):
        """The block-sparse kernel on a plan, plus the dropped blocks' pooled terms when ``compensate`` (default:
        the config's). Returns ``out`` or ``(out, lse)``."""
        cfg = self.config
        compensate = cfg.compensate if compensate is None else compensate
        block_size = plan.block_size or cfg.block_size
        out = block_sparse_attention(
            q, plan.k, plan.v, plan.block_index, plan.block_count, scale=scale, causal=causal,
            block_size=block_size, return_lse=return_lse or compensate, check_ids=False,
            precision=self._precision(q, block_size),
        )
        if not compensate:
            return out
        from ..kernels.dropped_blocks import add_dropped_blocks

        out, lse = add_dropped_blocks(q, plan.k, plan.v, plan.block_index, plan.block_count, *out, scale=scale,
                                      causal=causal, block_size=block_size)
        return (out, lse) if return_lse else out

    def _precision(self, q, block_size) -> str:
        """The config's precision, or "bf16" (warned once, counted in ``stats``) where the 8-bit kernels cannot
        run on these inputs."""
        precision = self.config.precision
        if precision == "bf16":
            return precision
        why = eight_bit_unsupported(q, block_size)
        if why is None:
            return precision
        warn_once(logger, f"{self.name}: precision={precision!r} falls back to the 16-bit kernel here: {why}")
        self.stats["precision_fallbacks"] = self.stats.get("precision_fallbacks", 0) + 1
        return "bf16"

    # -- what ran: kept density, for reports -------------------------------------------------------------
    def _count_kept(self, count, q, k, causal, layer=None) -> None:
        """Accumulate kept and visible block pairs on the device (no host sync on the hot path), and which
        layers ran sparse."""
        lay = layout(q.shape[2], k.shape[2], self.config.block_size, count.device, causal=causal)
        kept = count.sum(dtype=torch.int64)
        self.stats["sparse_calls"] = self.stats.get("sparse_calls", 0) + 1
        if layer is not None:
            self.stats.setdefault("sparse_layers", set()).add(layer)
        prev = self.stats.get("_kept")
        self.stats["_kept"] = kept if prev is None or prev.device != kept.device else prev + kept
        self.stats["_visible"] = self.stats.get("_visible", 0) + lay.visible_pairs * q.shape[0] * q.shape[1]

    def realised_density(self) -> float | None:
        """Kept over causally visible (query block, key block) pairs of every sparse call since the last reset
        (forced blocks included), or None before any sparse call."""
        if not self.stats.get("_visible"):
            return None
        return float(self.stats["_kept"]) / self.stats["_visible"]

    def describe(self) -> dict:
        out = super().describe()
        out = {k: v for k, v in out.items() if not k.startswith("_") and k != "sparse_layers"}
        density = self.realised_density()
        if density is not None:
            out["sparse_calls"] = self.stats["sparse_calls"]
            out["realised_density"] = round(density, 4)
        return out
