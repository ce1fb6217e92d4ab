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

Plain mode's first step reads the KV buffer at its capacity (``prefix_attention.kv_capacity``: the
whole preallocated cache k/v are views of): the prefix's full key blocks go through the block-sparse
kernel with capacity-sized ids and kept counts derived on the device from the prefix length, its
partial last key block (the tail) is a small masked window. So its shapes depend on the capacity, not
on the prefix length.

CUDA graphs (``cuda_graphs``: None, the default, uses them on CUDA inputs wherever a step's tensors stay put;
True also warns where they cannot be used; False never; CPU inputs run eager): a layer's steps are captured
into CUDA graphs and replayed (``step_cache.run_step``): the same functions, so the same kernels and bits,
without the per-kernel launch and Python cost. In plain mode, when k/v live in a persistent buffer (a
preallocated KV cache, or one buffer reused at the same prefix length), the first step is captured once per
layer and capacity and replayed at every block, and the cached steps read the block's rows from the buffer in
place; otherwise the first step runs eagerly and the cached steps copy the block's keys / values into fixed
buffers, so one graph still serves every block. Combined mode captures once per block. A method's graphs share
one memory pool: they run one at a time and each replay's outputs are copied out at once, so the pool holds
about one graph's work memory, not one per layer.

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
from ..kernels.merge.prefix import merge_prefix
from ..runtime import step_cache, step_state
from ..runtime.split_kv import choose_splits
from ..runtime.step_cache import GraphSlot, LayerCache, StepGraph, run_step, stale
from .base import AttentionMethod, MethodConfig, make_method, prefix_block_reason, register_method
from .dense import dense_attention
from .prefix_attention import kv_capacity, pack_factor, prefix_attention, prefix_partials, split_index, strided_layout
from .selectors import get_selector


@dataclasses.dataclass
class FlashBlockConfig(MethodConfig):
    """FlashBlock settings. ``refresh_every=None`` recomputes the external part once per block (the
    paper's default); ``sparse_selector`` turns on sparse external attention with residual correction."""

    refresh_every: int | None = None
    sparse_selector: str | None = None
    sparsity: float = 0.5  # sparsity handed to the selector in combined mode
    residual: bool = True  # combined mode: add the cached dense - sparse correction back
    cuda_graphs: bool | None = None  # replay each layer's steps as CUDA graphs; None: when they can (CUDA)

    def __post_init__(self):
        super().__post_init__()
        if self.plan_every:
            raise ValueError("plan_every is for the full-sequence block-sparse methods (ba_att, block_sparse); "
                             "FlashBlock refreshes its cache every refresh_every steps")
        if self.residual_every:
            raise ValueError("residual_every is for full-sequence methods (ba_att, block_sparse, sparsed); FlashBlock "
                             "caches its own dense - sparse residual per block: set sparse_selector (residual=True)")
        step_cache.validate_mode(self.cuda_graphs)
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


def tail_attention(q, wk, wv, bias, scale):
    """Attention of q ``(B, Hq, Nq, D)`` to a window of ``W`` keys ``(B, Hkv, W, D)`` with the additive key
    mask ``bias`` ``(W,)`` (0, or -1e30 on padding rows), in float32: ``(out, lse)``. A fully masked window
    gets an LSE near -1e30, which an LSE merge weighs exactly 0 (no -inf, so no NaN)."""
    bsz, hq, nq, d = q.shape
    hkv, w = wk.shape[1], wk.shape[2]
    rows = q.float().reshape(bsz * hkv, (hq // hkv) * nq, d)
    logits = torch.baddbmm(bias, rows, wk.float().reshape(bsz * hkv, w, d).transpose(1, 2), alpha=scale)
    lse = torch.logsumexp(logits, dim=-1)
    out = torch.bmm(torch.softmax(logits, dim=-1), wv.float().reshape(bsz * hkv, w, d))
    return out.view(bsz, hq, nq, d), lse.view(bsz, hq, nq)


@dataclasses.dataclass
class _External:
    """Combined mode's entry (one block): the cached residual and the selection it goes with."""

    out: torch.Tensor  # residual output dense - sparse, float32
    lse: torch.Tensor  # residual LSE
    block_index: torch.Tensor
    block_count: torch.Tensor
    split: tuple | None  # the selection laid out for split prefix attention (reused every step)
    step: int | None
    signature: tuple
    graph: object = None  # the cached step's CUDA graph (step_cache.run_step); goes with the entry


@dataclasses.dataclass(eq=False)
class _Plain:
    """Plain mode's state of one layer, kept across blocks and rewritten in place at each refresh, so captured
    steps stay valid. The prefix layout (``index`` .. ``cap``) is sized for the KV buffer's capacity and made
    again, dropping the graphs that read the buffer, when the capacity changes."""

    out: torch.Tensor  # (B, Hq, Nq, D) the cached prefix attention, q's dtype
    lse: torch.Tensor  # (B, Hq, Nq) float32
    n_dev: torch.Tensor  # () int64 the prefix length: the first step derives the counts and rows below from it
    blk_base: torch.Tensor  # (Nq,) int64 0, 1, ...
    blk_rows: torch.Tensor  # (Nq,) int64 the block's rows in the KV buffer (written by a graphed first step)
    tail_rows: torch.Tensor  # (block_size,) int64 0, 1, ...
    tail_idx: torch.Tensor  # (block_size,) int64 the prefix's partial last key block's rows, then its last row
    tail_bias: torch.Tensor  # (block_size,) float32 0 on the tail's rows, -1e30 on the padding
    signature: tuple
    index: torch.Tensor | None = None  # every key block id of the capacity, laid out for the splits
    count: torch.Tensor | None = None  # (1, 1, splits) int32 the prefix's full key blocks per split
    count_table: torch.Tensor | None = None  # (cap // block_size + 1, splits) int32: ``count`` per full-block count
    splits: int = 1
    cap: int = -1  # KV buffer rows the layout is sized for
    step: int | None = None
    epoch: int = -1  # the cache epoch (block) and prefix length the entry was refreshed for
    n_prefix: int = -1
    n_written: int = -1  # the prefix length ``n_dev`` holds
    in_place: bool = False  # this block's first step ran on the buffer as a graph: cached steps read it in place
    block_kv: tuple | None = None  # k / v addresses and strides at that first step
    kv_key: tuple | None = None  # the buffer's part of that first step's graph key
    seen: tuple | None = None  # (epoch, graph key) of the last first step
    graph: object = None  # the cached step reading the buffer in place (step_cache.run_step)
    first: GraphSlot = dataclasses.field(default_factory=GraphSlot)  # the first step's graph
    windowed: GraphSlot = dataclasses.field(default_factory=GraphSlot)  # the cached step on copied rows
    win_k: torch.Tensor | None = None  # fixed buffers the block's keys / values are copied into (windowed)
    win_v: torch.Tensor | None = None


def _buffer(k, v):
    """``(capacity, k view, v view)`` of the KV buffer k / v are the leading rows of (else k, v themselves)."""
    cap, kc = kv_capacity(k)
    vcap, vc = kv_capacity(v)
    return (cap, kc, vc) if vcap == cap else (k.shape[2], k, v)


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

    def dense_reason(self, q, k, *, causal=False) -> str | None:
        return prefix_block_reason(q, k, causal) or super().dense_reason(q, k, causal=causal)

    def sparse_attention(self, q, k, v, *, causal, scale, layer, frame_size, global_tokens, return_lse):
        nq, nk = q.shape[2], k.shape[2]
        if causal or nk <= nq:
            self.stats["dense_calls"] += 1
            return dense_attention(q, k, v, causal=causal, scale=scale, return_lse=return_lse)
        plain = self.config.sparse_selector is None
        state = step_state.current()
        # Plain mode keeps its entries (and graphs) across blocks, refreshed in place; combined mode's
        # selection changes shape with the prefix, so its entries go with the block.
        self._cache.sync(state, clear=not plain)
        if state.step is None:
            self._cache.warn_once("no denoising-step information; the external attention is computed once per "
                                  "block (block index or prefix length change) and reused until then.")
        name = self._cache.key(layer, state)
        (out, lse), replayed = (self._plain if plain else self._combined)(q, k, v, name, state, scale)
        if replayed:  # the graph's outputs are overwritten by its next replay
            out, lse = out.clone(), (lse.clone() if return_lse else lse)
        return (out, lse) if return_lse else out

    # -- plain mode ----------------------------------------------------------------------------------

    def _plain(self, q, k, v, name, state, scale):
        """One call: ``((out, lse), replayed)``."""
        cfg = self.config
        n = k.shape[2] - q.shape[2]
        scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
        signature = (q.shape, k.shape[1], k.shape[3], q.dtype, k.dtype, q.device, scale)
        entry = self._cache.entries.get(name)
        if entry is None or entry.signature != signature:
            entry = self._cache.entries[name] = self._new_plain(q, signature)
        mode = cfg.cuda_graphs
        graphs = mode is not False and step_cache.graphs_usable(q) and not step_cache.capturing(q)
        if entry.epoch != self._cache.epoch or entry.n_prefix != n or stale(entry.step, state.step, cfg.refresh_every):
            self.stats["refreshes"] += 1
            entry.epoch, entry.n_prefix, entry.step = self._cache.epoch, n, state.step
            return self._plain_first(q, k, v, entry, scale, graphs)
        self.stats["cached_calls"] += 1
        if not graphs:
            return self._inner(q, k[:, :, n:], v[:, :, n:], entry=entry, scale=scale), False
        if entry.in_place and (k.data_ptr(), v.data_ptr(), k.stride(), v.stride()) == entry.block_kv:
            # The buffer of this block's graphed first step: its block rows are read in place (no copies).
            held, key = entry.graph, (q.stride(), q.dtype) + entry.kv_key
            if isinstance(held, StepGraph) and held.key == key:
                return step_cache.replay(held, q), True
            if held is None:
                _, kc, vc = _buffer(k, v)
                return run_step(lambda *a: self._in_place(*a, entry=entry, scale=scale), entry, q, (kc, vc),
                                self._cache, mode, key=key, share=self._cache.graphs)
        # Any other k / v: the block's rows into fixed buffers, so one graph serves every block.
        kb, vb = k[:, :, n:], v[:, :, n:]
        if entry.win_k is None:
            entry.win_k, entry.win_v = torch.empty_like(kb), torch.empty_like(vb)
        entry.win_k.copy_(kb)
        entry.win_v.copy_(vb)
        return run_step(lambda *a: self._inner(*a, entry=entry, scale=scale), entry.windowed, q,
                        (entry.win_k, entry.win_v), self._cache, mode, share=self._cache.graphs)

    def _plain_first(self, q, k, v, entry, scale, graphs):
        """A block's first step (or a refresh): replayed, captured or eager; ``((out, lse), replayed)``."""
        n = k.shape[2] - q.shape[2]
        cap, kc, vc = _buffer(k, v)
        if entry.cap != cap:
            self._layout(entry, q, k.shape[1], cap)
        if entry.n_written != n:
            entry.n_dev.fill_(n)
            entry.n_written = n
        entry.in_place = False
        if graphs:
            key, epoch, slot = step_cache.graph_key(q, (kc, vc)), self._cache.epoch, entry.first
            fits = isinstance(slot.graph, StepGraph) and slot.graph.key == key
            # Captured on a buffer that outlives a block: a preallocated cache (rows to spare) at once, another
            # one when the previous block's first step used it too. Hosts that build k / v per call stay eager.
            again = entry.seen is not None and entry.seen[1] == key and entry.seen[0] != epoch
            if not fits and slot.graph is not False and ((slot.graph is None and cap > k.shape[2]) or again):
                slot.graph = entry.graph = None  # (re)captured below; the in-place cached step follows it
                fits = True
            entry.seen = (epoch, key)
            if fits:
                entry.in_place = True
                entry.block_kv, entry.kv_key = (k.data_ptr(), v.data_ptr(), k.stride(), v.stride()), key[2:]
                return run_step(lambda *a: self._first(*a, entry=entry, scale=scale), slot, q, (kc, vc), self._cache,
                                True, key=key, share=self._cache.graphs)
        return self._first(q, kc, vc, k[:, :, n:], v[:, :, n:], entry=entry, scale=scale), False

    def _new_plain(self, q, signature):
        bs, (bsz, hq, nq, _), dev = self.config.block_size, q.shape, q.device
        i64 = dict(dtype=torch.int64, device=dev)
        return _Plain(out=torch.zeros(q.shape, dtype=q.dtype, device=dev),
                      lse=torch.zeros(bsz, hq, nq, dtype=torch.float32, device=dev), n_dev=torch.zeros((), **i64),
                      blk_base=torch.arange(nq, **i64), blk_rows=torch.zeros(nq, **i64),
                      tail_rows=torch.arange(bs, **i64), tail_idx=torch.zeros(bs, **i64),
                      tail_bias=torch.zeros(bs, dtype=torch.float32, device=dev), signature=signature)

    def _layout(self, entry, q, hkv, cap):
        """The prefix layout for a KV buffer of ``cap`` rows: every key block id laid out for the splits (split
        ``s`` takes blocks ``s, s + splits, ...``, so any prefix spreads evenly) and the kept counts per split for
        each number of full blocks. Made once per capacity; drops the graphs that read the old buffer."""
        bs, (hq, nq), dev = self.config.block_size, q.shape[1:3], q.device
        nkb = max(cap // bs, 1)
        splits = choose_splits(q, nkb, heads=hq // pack_factor(hq, hkv, nq, bs, None)) if nq <= bs else 1
        every = torch.arange(nkb, dtype=torch.int32, device=dev).view(1, 1, 1, nkb)
        full = torch.arange(nkb + 1, device=dev)[:, None] + (splits - 1) - torch.arange(splits, device=dev)
        entry.index = strided_layout(every, splits) if splits > 1 else every
        entry.count_table = torch.div(full, splits, rounding_mode="floor").clamp_(min=0).to(torch.int32)
        entry.count = torch.zeros(1, 1, splits, dtype=torch.int32, device=dev)
        entry.splits, entry.cap = splits, cap
        entry.first, entry.graph, entry.seen, entry.in_place = GraphSlot(), None, None, False

    def _first(self, q, kc, vc, kb=None, vb=None, *, entry, scale):
        """A block's first step (and each refresh), run eagerly or captured: the prefix attention over the KV
        buffer ``kc, vc`` into the entry's cache, then a cached step. Full key blocks go through the kernel,
        the partial last one (the tail) is a masked window; their extents come from ``entry.n_dev``, so the
        shapes depend on the capacity only. ``kb, vb``: the block's keys / values (eager); None: gathered
        from the buffer, whose block rows the in-place cached steps then read too. Returns (out, lse)."""
        bs, nq, n = self.config.block_size, q.shape[2], entry.n_dev
        rem = n.remainder(bs)
        start = n - rem
        torch.index_select(entry.count_table, 0, start.div(bs, rounding_mode="floor").view(1),
                           out=entry.count.view(1, -1))
        torch.minimum(start + entry.tail_rows, n - 1, out=entry.tail_idx)  # padding repeats the last prefix row
        torch.mul(torch.ge(entry.tail_rows, rem), -1e30, out=entry.tail_bias)
        if kb is None:
            torch.add(entry.blk_base, n, out=entry.blk_rows)
            kb, vb = kc.index_select(2, entry.blk_rows), vc.index_select(2, entry.blk_rows)
        count = entry.count.expand(*entry.index.shape[:3])
        split = (entry.index, count, entry.splits) if entry.splits > 1 else None
        parts = prefix_partials(q, kc, vc, entry.index, count, scale=scale, block_size=bs, split=split, splits=1)
        tail = tail_attention(q, kc.index_select(2, entry.tail_idx), vc.index_select(2, entry.tail_idx),
                              entry.tail_bias, scale)
        ext_out, ext_lse = merge_prefix(parts.out, parts.lse, nq, tail, out_dtype=q.dtype, pack=parts.pack)
        entry.out.copy_(ext_out)
        entry.lse.copy_(ext_lse)
        return self._inner(q, kb, vb, entry=entry, scale=scale)

    @staticmethod
    def _inner(q, kb, vb, *, entry, scale):
        """A cached step: the in-block attention merged with the cached prefix attention."""
        in_out, in_lse = dense_attention(q, kb, vb, scale=scale, return_lse=True)
        return merge_attention(entry.out, entry.lse, in_out, in_lse)

    @staticmethod
    def _in_place(q, kc, vc, *, entry, scale):
        """A cached step reading the block's rows from the KV buffer (rows written by the first step)."""
        kb, vb = kc.index_select(2, entry.blk_rows), vc.index_select(2, entry.blk_rows)
        return FlashBlockMethod._inner(q, kb, vb, entry=entry, scale=scale)

    # -- combined mode -------------------------------------------------------------------------------

    def _sparse_parts(self):
        cfg = self.config
        if self._selector is None:
            sel_cfg = selector_config(cfg.sparse_selector, cfg, cfg.sparsity, cfg.block_size)
            block_size = getattr(sel_cfg, "block_size", cfg.block_size)
            self._selector = (get_selector(cfg.sparse_selector), sel_cfg, block_size)
        return self._selector

    def _split(self, q, kp, index, count):
        """The cached selection laid out once for split prefix attention (short blocks on a GPU)."""
        block_size = self._sparse_parts()[2]
        splits = choose_splits(q, index.shape[-1])
        if q.shape[2] > block_size or splits == 1:
            return None
        return split_index(index, count, math.ceil(kp.shape[2] / block_size), splits, q.device)

    def _combined(self, q, k, v, name, state, scale):
        """One call: ``((out, lse), replayed)``."""
        cfg = self.config
        signature = (tuple(q.shape), tuple(k.shape), q.dtype, q.device, scale)
        entry = self._cache.entries.get(name)
        if entry is None or entry.signature != signature or stale(entry.step, state.step, cfg.refresh_every):
            kp, vp, kb, vb = split_prefix(k, v, q.shape[2])
            ext_out, ext_lse = prefix_attention(q, kp, vp, scale=scale, block_size=cfg.block_size)
            selector, sel_cfg, block_size = self._sparse_parts()
            index, count = selector(q, kp, sel_cfg, causal=False, scale=scale)
            split = self._split(q, kp, index, count)
            sp_out, sp_lse = prefix_attention(q, kp, vp, index, count, scale=scale, block_size=block_size,
                                              split=split)
            # Residuals in float32: they are small differences of bf16 quantities.
            res_lse = torch.nan_to_num(ext_lse - sp_lse, nan=0.0, posinf=0.0, neginf=0.0)
            self._cache.entries[name] = _External(ext_out.float() - sp_out.float(), res_lse, index, count, split,
                                                  state.step, signature)
            self.stats["refreshes"] += 1
            in_out, in_lse = dense_attention(q, kb, vb, scale=scale, return_lse=True)
            return merge_attention(ext_out, ext_lse, in_out, in_lse), False
        self.stats["cached_calls"] += 1
        return run_step(lambda *a: self._steady(*a, entry=entry, scale=scale), entry, q, (k, v), self._cache,
                        cfg.cuda_graphs, share=self._cache.graphs)

    def _steady(self, q, k, v, *, entry, scale):
        """A combined-mode cached step, run eagerly or captured: the sparse prefix partials, the in-block
        attention and one fused pass (split merge, residual, block merge)."""
        nq = q.shape[2]
        kp, vp, kb, vb = split_prefix(k, v, nq)
        parts = prefix_partials(q, kp, vp, entry.block_index, entry.block_count, scale=scale,
                                block_size=self._sparse_parts()[2], split=entry.split)
        inner = dense_attention(q, kb, vb, scale=scale, return_lse=True)
        return merge_prefix(parts.out, parts.lse, nq, inner, pack=parts.pack,
                            residual=(entry.out, entry.lse) if self.config.residual else None)
