"""FlashBlock: in block diffusion, cache the attention to tokens outside the active block.

Call convention (block diffusion, not causal): q holds the active block's ``Nq`` tokens; k and v hold
``[prefix (Nk - Nq) | active block (Nq)]``. The prefix is the prompt and the committed blocks (text),
or the earlier frames' tokens of block-causal video (SkyReels-V2 diffusion forcing with a KV cache of
earlier frames: the current frame block attends all earlier frames and itself, so the host calls us
exactly as for text).

  * At a block's first step (and every ``refresh_every`` steps): block-external attention
    (q vs prefix) with its LSE is computed and cached per layer.
  * At the other steps only block-internal attention (q vs the last ``Nq`` keys) runs; it is merged
    with the cached external part by LSE (``kernels.merge_attention``), which is exact for disjoint
    key sets. ``refresh_every=1`` is therefore dense attention to rounding.
  * Combined mode (``sparse_selector`` = any registered selector name, e.g. ``"ba_att"``): the external
    part is block-sparse attention recomputed every step, plus a residual ``dense - sparse`` (output
    and LSE) cached at the refresh step. The selection is cached with the residual so they match;
    at the refresh step ``sparse + residual`` is the dense external attention exactly.

``cuda_graphs=True`` (CUDA only; ignored on CPU): a layer's first cached step is captured into a CUDA
graph and the later ones replay it (``step_cache.run_step``): the same function, so the same kernels
and bits, without the per-kernel launch and Python cost. In plain mode the layer's entry is rewritten
in place at each refresh and the block's keys / values are copied into fixed buffers, so one graph
serves every block of a generation; combined mode captures once per block.

Caches are refreshed when ``step_state.block`` changes and when the prefix length changes (combined
mode drops them), and dropped at a new generation (base class). Without step information a cache lives
until one of those happens.
Causal calls and calls without a prefix (``Nk <= Nq``) run dense: there is nothing to cache.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from ..kernels import merge_attention
from ..kernels.prefix_merge import merge_prefix
from . import step_cache, step_state
from .base import AttentionMethod, MethodConfig, make_method, register_method
from .dense import dense_attention
from .prefix_attention import choose_splits, prefix_attention, prefix_partials, split_index
from .selectors import get_selector
from .step_cache import LayerCache, run_step, stale


@dataclasses.dataclass
class FlashBlockConfig(MethodConfig):
    """FlashBlock settings. ``refresh_every=None`` recomputes the external part once per block (the
    paper's default); ``sparse_selector`` turns on sparse external attention with residual correction."""

    refresh_every: int | None = None
    sparse_selector: str | None = None
    sparsity: float = 0.5  # sparsity handed to the selector in combined mode
    residual: bool = True  # combined mode: add the cached dense - sparse correction back
    cuda_graphs: bool = False  # replay each layer's cached steps as a CUDA graph (CUDA only)

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.cuda_graphs, bool):
            raise ValueError(f"cuda_graphs must be a bool, got {self.cuda_graphs!r}")
        if self.refresh_every is not None and (not isinstance(self.refresh_every, int) or self.refresh_every < 1):
            raise ValueError(f"refresh_every must be None or an int >= 1, got {self.refresh_every!r}")
        if not 0.0 <= float(self.sparsity) < 1.0:
            raise ValueError(f"sparsity must lie in [0, 1), got {self.sparsity!r}")
        if self.sparse_selector is not None:
            get_selector(self.sparse_selector)  # fails early, listing the registered names


def selector_config(name: str, fallback: MethodConfig, sparsity: float, block_size: int):
    """The config a selector expects: its own method's config when a method of that name exists
    (e.g. ``"ba_att"`` -> ``BAAttConfig``), otherwise ``fallback`` (which has block_size, sparsity)."""
    try:
        return make_method(name, sparsity=sparsity, block_size=block_size).config
    except (ValueError, TypeError):
        return fallback


def split_prefix(k, v, nq):
    """``[prefix | active block]`` -> (prefix k, prefix v, block k, block v)."""
    n_prefix = k.shape[2] - nq
    return k[:, :, :n_prefix], v[:, :, :n_prefix], k[:, :, n_prefix:], v[:, :, n_prefix:]


@dataclasses.dataclass
class _External:
    out: torch.Tensor  # dense external output (plain mode) or residual output, float32 (combined)
    lse: torch.Tensor  # dense external LSE (plain) or residual LSE (combined)
    block_index: torch.Tensor | None
    block_count: torch.Tensor | None
    split: tuple | None  # the selection laid out for split prefix attention (reused every step)
    step: int | None
    signature: tuple
    graph: object = None  # the steady-state step's CUDA graph (step_cache.run_step); goes with the entry
    epoch: int = -1  # plain mode: the cache epoch (block) and prefix length the entry was refreshed for
    n_prefix: int = -1
    window: tuple | None = None  # plain mode with graphs: fixed buffers the block's keys / values are copied into


@register_method
class FlashBlockMethod(AttentionMethod):
    name = "flashblock"
    config_class = FlashBlockConfig

    def __init__(self, config=None, **overrides):
        super().__init__(config, **overrides)
        self._cache = LayerCache("FlashBlock")
        self._selector = None
        self.reset()

    def reset(self) -> None:
        self._cache.clear()
        self.stats = {"refreshes": 0, "cached_calls": 0, "dense_calls": 0}

    def cache_bytes(self) -> int:
        return self._cache.nbytes()

    def _sparse_parts(self):
        cfg = self.config
        if self._selector is None:
            sel_cfg = selector_config(cfg.sparse_selector, cfg, cfg.sparsity, cfg.block_size)
            block_size = getattr(sel_cfg, "block_size", cfg.block_size)
            self._selector = (get_selector(cfg.sparse_selector), sel_cfg, block_size)
        return self._selector

    def _external_sparse(self, q, kp, vp, index, count, scale, split=None):
        block_size = self._sparse_parts()[2]
        return prefix_attention(q, kp, vp, index, count, scale=scale, block_size=block_size, split=split)

    def _split(self, q, kp, index, count):
        """The cached selection laid out once for split prefix attention (short blocks on a GPU)."""
        block_size = self._sparse_parts()[2]
        splits = choose_splits(q, index.shape[-1])
        if q.shape[2] > block_size or splits == 1:
            return None
        return split_index(index, count, math.ceil(kp.shape[2] / block_size), splits, q.device)

    def _refresh(self, q, kp, vp, scale, step, signature, reuse=None):
        ext_out, ext_lse = prefix_attention(q, kp, vp, scale=scale, block_size=self.config.block_size)
        index = count = split = None
        if self.config.sparse_selector is None:
            if reuse is not None:  # plain mode: rewrite in place, so a captured step stays valid
                reuse.out.copy_(ext_out)
                reuse.lse.copy_(ext_lse)
                reuse.step = step
                self.stats["refreshes"] += 1
                return reuse, (ext_out, ext_lse)
            stored = (ext_out.clone(), ext_lse.clone())
        else:
            selector, sel_cfg, _ = self._sparse_parts()
            index, count = selector(q, kp, sel_cfg, causal=False, scale=scale)
            split = self._split(q, kp, index, count)
            sp_out, sp_lse = self._external_sparse(q, kp, vp, index, count, scale, split)
            # Residuals in float32: they are small differences of bf16 quantities.
            res_lse = torch.nan_to_num(ext_lse - sp_lse, nan=0.0, posinf=0.0, neginf=0.0)
            stored = (ext_out.float() - sp_out.float(), res_lse)
        self.stats["refreshes"] += 1
        return _External(*stored, index, count, split, step, signature), (ext_out, ext_lse)

    def sparse_attention(self, q, k, v, *, causal, scale, layer, frame_size, global_tokens, return_lse):
        nq, nk = q.shape[2], k.shape[2]
        if causal or nk <= nq:
            self.stats["dense_calls"] += 1
            return dense_attention(q, k, v, causal=causal, scale=scale, return_lse=return_lse)
        cfg = self.config
        plain = cfg.sparse_selector is None
        state = step_state.current()
        # Plain mode keeps its entries (and graphs) across blocks, refreshed in place; combined mode's
        # selection changes shape with the prefix, so its entries go with the block.
        self._cache.sync(state, clear=not plain)
        if state.step is None:
            self._cache.warn_once("no denoising-step information; the external attention is computed once per "
                                  "block (block index or prefix length change) and reused until then.")
        key = self._cache.key(layer, state)
        shape = (tuple(q.shape), tuple(k.shape[:2]) + (k.shape[3],), q.dtype, k.dtype, q.device, scale)
        signature = shape if plain else (tuple(q.shape), tuple(k.shape), q.dtype, q.device, scale)
        kp, vp, kb, vb = split_prefix(k, v, nq)
        entry = self._cache.entries.get(key)
        same = entry is not None and entry.signature == signature
        if (not same or entry.epoch != self._cache.epoch or entry.n_prefix != nk - nq
                or stale(entry.step, state.step, cfg.refresh_every)):
            entry, (ext_out, ext_lse) = self._refresh(q, kp, vp, scale, state.step, signature,
                                                      reuse=entry if plain and same else None)
            entry.epoch, entry.n_prefix = self._cache.epoch, nk - nq
            self._cache.entries[key] = entry
            in_out, in_lse = dense_attention(q, kb, vb, scale=scale, return_lse=True)
            out, lse = merge_attention(ext_out, ext_lse, in_out, in_lse)
            return (out, lse) if return_lse else out
        self.stats["cached_calls"] += 1
        pinned = (k, v)
        if plain and cfg.cuda_graphs and step_cache.graphs_usable(q):  # the block's rows into fixed buffers:
            # one graph for every block
            if entry.window is None:
                entry.window = (torch.empty_like(kb), torch.empty_like(vb))
            entry.window[0].copy_(kb)
            entry.window[1].copy_(vb)
            pinned = entry.window
        (out, lse), replayed = run_step(lambda q_, k_, v_: self._steady(q_, k_, v_, entry, scale), entry, q, pinned,
                                        self._cache, cfg.cuda_graphs)
        if replayed:  # the graph's outputs are overwritten by its next replay
            out, lse = out.clone(), (lse.clone() if return_lse else lse)
        return (out, lse) if return_lse else out

    def _steady(self, q, k, v, entry, scale):
        """A cached step, run eagerly or captured: plain mode merges the in-block attention with the
        cached prefix attention; combined mode adds the sparse prefix partials, the in-block attention
        and one fused pass (split merge, residual, block merge)."""
        nq = q.shape[2]
        if self.config.sparse_selector is None:  # k, v: the whole buffer, or only the block's rows (window)
            kb, vb = k[:, :, k.shape[2] - nq:], v[:, :, v.shape[2] - nq:]
            in_out, in_lse = dense_attention(q, kb, vb, scale=scale, return_lse=True)
            return merge_attention(entry.out, entry.lse, in_out, in_lse)
        kp, vp, kb, vb = split_prefix(k, v, nq)
        parts = prefix_partials(q, kp, vp, entry.block_index, entry.block_count, scale=scale,
                                block_size=self._sparse_parts()[2], split=entry.split)
        inner = dense_attention(q, kb, vb, scale=scale, return_lse=True)
        return merge_prefix(parts.out, parts.lse, nq, inner, pack=parts.pack,
                            residual=(entry.out, entry.lse) if self.config.residual else None)
