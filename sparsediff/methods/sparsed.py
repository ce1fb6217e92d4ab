"""SparseD: full attention for the early denoising steps, then one cached block-sparse pattern per
layer and head, reused for every later step (no per-step selection cost).

Schedule (per generation, and per block in block diffusion):
  * steps ``< dense_step_fraction * total`` (or ``< dense_steps``): exact dense attention (base class);
  * the first later step of a layer (the *switch step*): pass 1 runs dense attention with its LSE (its
    output is returned, so that step stays exact), pass 2 sums the probabilities of every
    (query-block, key-block) tile (``kernels.tile_mass``, no N x N map); each query block of each head
    keeps its top ``floor(n_kv_blocks * keep_ratio) + 1`` key blocks by mean tile probability;
  * every step after: block-sparse attention over the cached pattern (refreshed every
    ``refresh_every`` steps when set).

The cache holds int32 block indices on the device, keyed by layer; ``cache_bytes()`` reports it. It
is cleared at a new generation (base class) and when ``step_state.block`` changes (block diffusion).

Without step information (``step_state.step`` is None, e.g. a host that never calls
``denoising_step``) there is no dense window: the pattern is computed at a layer's first call and
reused for all later calls until the generation or block changes; a warning says so once.
Hosts should pass ``layer=``; when they do not, layers are told apart by their call order within a
step (needs step information), and without step information all layers share one pattern (warned).
"""

from __future__ import annotations

import dataclasses
import math

import torch

from ..kernels import block_sparse_attention, causal_block_mask, mask_to_index
from ..kernels.tile_mass import row_lse, tile_mass
from ..runtime import step_state
from ..runtime.step_cache import LayerCache, stale
from .base import AttentionMethod, MethodConfig, register_method


@dataclasses.dataclass
class SparseDConfig(MethodConfig):
    """SparseD settings. Defaults follow the reference implementation's README (INV-WZQ/SparseD):
    ``skip`` = 0.2 of the steps dense, ``select`` = 0.3 of the key blocks kept, block size 128
    (its short-prompt settings are select 0.5, block 32)."""

    dense_step_fraction: float = 0.2  # SparseD's `skip`
    keep_ratio: float = 0.3  # SparseD's `select`: share of key blocks kept per query block
    sparsity: float | None = None  # alias: when given, keep_ratio = 1 - sparsity (then stored as None)
    refresh_every: int | None = None  # recompute the pattern every this many steps; None = never

    def __post_init__(self):
        super().__post_init__()
        if self.plan_every:
            raise ValueError("plan_every is for the block-sparse methods (ba_att, block_sparse); SparseD keeps the "
                             "pattern of its switch step (refresh_every re-selects it)")
        if self.sparsity is not None:
            if not 0.0 <= float(self.sparsity) < 1.0:
                raise ValueError(f"sparsity must lie in [0, 1), got {self.sparsity!r}")
            # Consumed here so that replace(keep_ratio=...) later is not silently overridden.
            self.keep_ratio, self.sparsity = 1.0 - float(self.sparsity), None
        if not 0.0 < float(self.keep_ratio) <= 1.0:
            raise ValueError(f"keep_ratio must lie in (0, 1], got {self.keep_ratio!r}")
        if self.refresh_every is not None and (not isinstance(self.refresh_every, int) or self.refresh_every < 1):
            raise ValueError(f"refresh_every must be None or an int >= 1, got {self.refresh_every!r}")


def blocks_to_keep(num_kv_blocks: int, keep_ratio: float) -> int:
    """SparseD's budget: floor(n_kv_blocks * keep) + 1 key blocks per query block (at most all)."""
    return min(num_kv_blocks, math.floor(num_kv_blocks * keep_ratio) + 1)


def select_from_mass(mass, keep_ratio, *, global_tokens=0, block_size=128, visible=None):
    """Top key blocks per (batch, head, query block) by tile mass -> ``(block_index, block_count)``.

    ``visible`` ``(nqb, nkb)`` bool (causal calls): each query block's budget counts its visible key blocks
    only, and only those compete, so a sparsity means the share of visible blocks skipped, as for every
    method. Blocks holding any of the first ``global_tokens`` tokens are always kept as columns, and query
    blocks holding them keep every key block (global tokens attend everything).
    """
    nqb, nkb = mass.shape[-2:]
    if visible is None:
        keep = blocks_to_keep(nkb, keep_ratio)
        top = torch.topk(mass, keep, dim=-1, sorted=False).indices
        mask = torch.zeros_like(mass, dtype=torch.bool).scatter_(-1, top, True)
    else:
        n_vis = visible.sum(-1)  # (nqb,)
        keep = torch.minimum(n_vis, torch.floor(n_vis.double() * keep_ratio).long() + 1)
        order = mass.masked_fill(~visible, float("-inf")).argsort(dim=-1, descending=True)
        rank = torch.empty_like(order).scatter_(-1, order, torch.arange(nkb, device=mass.device).expand_as(order))
        mask = (rank < keep[:, None]) & visible
    if global_tokens > 0:
        g = math.ceil(global_tokens / block_size)
        mask[..., :g] = True
        mask[..., : min(g, nqb), :] = True
    return mask_to_index(mask)


@dataclasses.dataclass
class _Pattern:
    block_index: torch.Tensor
    block_count: torch.Tensor
    step: int | None
    signature: tuple  # shapes and flags the pattern was computed for


@register_method
class SparseDMethod(AttentionMethod):
    name = "sparsed"
    config_class = SparseDConfig

    def __init__(self, config=None, **overrides):
        super().__init__(config, **overrides)
        self._cache = LayerCache("SparseD")
        self.reset()

    def reset(self) -> None:
        self._cache.clear()
        self.stats = {"selections": 0, "sparse_calls": 0, "density": None}

    def cache_bytes(self) -> int:
        """Device memory held by cached patterns (block indices and counts)."""
        return self._cache.nbytes()

    def dense_reason(self, q, k, *, causal=False) -> str | None:
        # A causal model's forward passes are independent prompts: without denoising steps a cached pattern
        # would carry the first prompt's blocks to every later one.
        if causal and step_state.current().step is None:
            return "dense_no_steps"
        return super().dense_reason(q, k, causal=causal)

    # -- attention ------------------------------------------------------------------------------
    def sparse_attention(self, q, k, v, *, causal, scale, layer, frame_size, global_tokens, return_lse):
        cfg = self.config
        state = step_state.current()
        self._cache.sync(state)  # a new block in block diffusion: patterns belong to the old one
        if state.step is None:
            self._cache.warn_once("no denoising-step information (step_state.step is None); computing the "
                                  "pattern at each layer's first call and reusing it. Wrap steps in "
                                  "sparsediff.denoising_step(i, total) for the dense early steps.")
        key = self._cache.key(layer, state)
        signature = (tuple(q.shape), tuple(k.shape), bool(causal), int(global_tokens), q.device)
        pattern = self._cache.entries.get(key)
        if pattern is None or pattern.signature != signature or stale(pattern.step, state.step, cfg.refresh_every):
            # Switch step: pass 1 is exact dense attention, so this step's output stays dense.
            out, lse = row_lse(q, k, v, scale=scale, causal=causal, block_size=cfg.block_size)
            mass = tile_mass(q, k, lse, scale=scale, causal=causal, block_size=cfg.block_size)
            nqb, nkb = mass.shape[-2:]
            visible = causal_block_mask(nqb, nkb, q.shape[2], k.shape[2], cfg.block_size, q.device) if causal \
                else None
            index, count = select_from_mass(mass, cfg.keep_ratio, global_tokens=global_tokens,
                                            block_size=cfg.block_size, visible=visible)
            self._cache.entries[key] = _Pattern(index, count, state.step, signature)
            self.stats["selections"] += 1
            # Kept over visible (query block, key block) pairs, as every method reports it.
            n_visible = int(visible.sum()) if visible is not None else nqb * nkb
            self.stats["density"] = float(count.double().mean()) * nqb / n_visible
            return (out, lse) if return_lse else out
        self.stats["sparse_calls"] += 1
        return block_sparse_attention(
            q, k, v, pattern.block_index, pattern.block_count, scale=scale, causal=causal,
            block_size=cfg.block_size, return_lse=return_lse, check_ids=False,
        )

    def patterns(self) -> dict:
        """The cached ``layer -> (block_index, block_count)`` (for inspection and tests)."""
        return {key: (p.block_index, p.block_count) for key, p in self._cache.entries.items()}

    def describe(self) -> dict:
        return {**super().describe(), "cache_bytes": self.cache_bytes(), **self.stats}
