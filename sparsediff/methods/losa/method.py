"""The LoSA method: a block's first step, its cached steps, and their CUDA-graph replay."""

from __future__ import annotations

import math

import torch

from ...kernels import index_to_mask, mask_to_index
from ...kernels.merge.prefix import merge_prefix
from ...kernels.outlier_keys import outlier_key_features
from ...runtime import step_cache, step_state
from ...runtime.split_kv import choose_splits, one_wave_splits
from ...runtime.step_cache import LayerCache, run_step
from ..base import AttentionMethod, prefix_block_reason, register_method
from ..dense import dense_attention
from ..flashblock import selector_config
from ..prefix_attention import (
    ActiveRows,
    Partials,
    active_first_partials,
    active_first_rows,
    kv_capacity,
    pack_factor,
    prefix_attention,
    prefix_partials,
    strided_layout,
)
from ..selectors import get_selector
from .config import LoSAConfig
from .reference import mean_key_rank, rank_blocks
from .state import _Prefix
from .step_kernels import (
    active_first_order,
    mean_key_score,
    prefix_block_means,
    step_lengths,
    token_change_update,
    window_attention,
)


@register_method
class LoSAMethod(AttentionMethod):
    name = "losa"
    config_class = LoSAConfig

    def __init__(self, config=None, **overrides):
        super().__init__(config, **overrides)
        self._cache = LayerCache("LoSA")
        self.reset()

    def reset(self) -> None:
        self._cache.clear()
        self.stats = {"per_step": {}, "full_refreshes": 0}

    def cache_bytes(self) -> int:
        return self._cache.nbytes()

    def _record(self, state, stat, ratio):
        # ``stat`` (B, Nq + 1): the active mask and, last, whether a row had any active token. Summed on
        # the device (one op per call, no sync, outside a captured step: a replay's stat is overwritten by the
        # next replay, so the first call of a step copies it); step_report() converts.
        key = (state.block, state.step)
        rec = self.stats["per_step"].get(key)
        if rec is None:
            self.stats["per_step"][key] = {"block": state.block, "step": state.step, "calls": 1, "ratio": ratio,
                                           "counts": stat.to(torch.int32)}
            return
        rec["counts"].add_(stat)
        rec["ratio"] += ratio
        rec["calls"] += 1

    def step_report(self) -> list[dict]:
        """Per (block, step): share of active tokens and union density (kept prefix key blocks / all,
        counted 0 for batch rows without an active token), averaged over layers."""
        out = []
        for r in self.stats["per_step"].values():
            calls, counts = r["calls"], r["counts"]
            share = float(counts[:, :-1].sum()) / (calls * counts[:, :-1].numel())
            any_share = float(counts[:, -1].sum()) / (calls * counts.shape[0])
            out.append({"block": r["block"], "step": r["step"], "layers": calls, "active_share": share,
                        "union_density": any_share * r["ratio"] / calls})
        return out

    def _keep(self, nkb):
        return 0 if nkb == 0 else max(1, min(nkb, round(nkb * (1.0 - self.config.sparsity))))

    def _selector_prefix(self, q, active, kp, vp, scale):
        """Registered-selector path: the selector sees the active tokens only (gathered per batch row)."""
        cfg = self.config
        nkb = math.ceil(kp.shape[2] / cfg.block_size)
        sel_cfg = selector_config(cfg.selector, cfg, cfg.sparsity, cfg.block_size)
        if getattr(sel_cfg, "block_size", cfg.block_size) != cfg.block_size:
            raise ValueError(f"selector {cfg.selector!r} uses block_size {sel_cfg.block_size}, LoSA {cfg.block_size}")
        out = torch.zeros_like(q)
        lse = torch.full(q.shape[:3], float("-inf"), device=q.device)
        density = torch.zeros((), device=q.device)
        for b in range(q.shape[0]):
            ids = active[b].nonzero().squeeze(1)
            if ids.numel() == 0:
                continue
            q_act = q[b : b + 1, :, ids]
            index, count = get_selector(cfg.selector)(q_act, kp[b : b + 1], sel_cfg, causal=False, scale=scale)
            union = index_to_mask(index, count, nkb).expand(1, q.shape[1], -1, -1).any(dim=2)
            u_index, u_count = mask_to_index(union[:, :, None, :])
            o, s = prefix_attention(q_act, kp[b : b + 1], vp[b : b + 1], u_index, u_count, scale=scale,
                                    block_size=cfg.block_size)
            out[b, :, ids], lse[b, :, ids] = o[0], s[0]
            density = density + union.float().mean() / q.shape[0]
        return out, lse, density

    def _new_entry(self, q, cap, kv_dtype, signature):
        """Zeroed state for a KV buffer of ``cap`` rows (allocated once per capacity, not per block)."""
        cfg = self.config
        bsz, hq, nq, d = q.shape
        hkv = signature[4][1]
        nkb_cap = cap // cfg.block_size
        keep_cap = nkb_cap if cfg.sparsity == 0.0 else self._keep(nkb_cap)
        index_heads = None if cfg.sparsity == 0.0 else (hkv if cfg.union == "kv_head" else hq)
        pack = pack_factor(hq, hkv, nq, cfg.block_size, index_heads)
        tiles = -(-nq * (hq // hkv) // cfg.block_size)  # query tiles of the active-first stacked rows
        if nq > cfg.block_size:
            splits = 1
        elif cfg.union_splits is not None:
            splits = max(1, min(cfg.union_splits, keep_cap))
        elif tiles == 1 and pack > 1:
            # A KV group's stacked rows fill one tile (short blocks, GQA): one wave of programs, >= 2 blocks each.
            # H100, 32-token blocks, whole blocks graphed: 16k 1.54 -> 1.74x, 128k 4.62 -> 4.80-4.84x, 64k equal.
            splits = one_wave_splits(q, keep_cap, heads=hq // pack)
        else:
            # At least 8 kept blocks per split: fewer, shorter programs ran 3-6 % slower per block at 64k / 128k
            # on an H100 (their prologue and the merge's walk over the splits cost more than they spread); at
            # 128-token blocks one wave was slower at 16k (1.84 -> 1.63-1.69x) and no faster above.
            splits = choose_splits(q, keep_cap, 8, heads=hq // pack)
        dev = q.device
        if q.is_cuda:
            step_cache.prepare_branch(dev)  # the window's branch stream (cached steps captured later)
        every = torch.arange(nkb_cap, dtype=torch.int32, device=dev).view(1, 1, 1, nkb_cap)
        index = None
        if cfg.sparsity == 0.0:
            index = strided_layout(every, splits) if splits > 1 else every
            index = index.repeat_interleave(tiles, dim=2) if tiles > 1 else index
        dense_pack = pack_factor(hq, hkv, nq, cfg.block_size, None)
        dense_splits = choose_splits(q, nkb_cap, heads=hq // dense_pack) if nq <= cfg.block_size else 1
        w = cfg.block_size + nq
        f32 = dict(dtype=torch.float32, device=dev)
        # Kept counts per split for every prefix length, laid out once (strided_counts of each row's keep).
        nkbs = torch.arange(nkb_cap + 1)
        keeps = nkbs if cfg.sparsity == 0.0 else torch.tensor([self._keep(n) for n in range(nkb_cap + 1)])

        def table(kept, s):
            return torch.div(kept[:, None] + (s - 1) - torch.arange(s), s, rounding_mode="floor").clamp_(min=0).to(
                device=dev, dtype=torch.int32)

        return _Prefix(out=torch.zeros(q.shape, dtype=q.dtype, device=dev), lse=torch.zeros(bsz, hq, nq, **f32),
                       q_ref=torch.zeros(q.shape, **f32), ref_thr=torch.zeros(bsz, nq, **f32),
                       means_t=torch.zeros(bsz, hkv, d, nkb_cap, **f32), bias=torch.zeros(nkb_cap, **f32),
                       last_keys=torch.full((bsz, hkv, nkb_cap, d), float("nan"), dtype=kv_dtype, device=dev),
                       outliers_t=torch.zeros(bsz, hkv, d, nkb_cap, **f32) if cfg.outlier_keys else None,
                       index=index, count=torch.zeros(1, 1, splits, dtype=torch.int32, device=dev),
                       count_tiles=torch.zeros(1, 1, splits * tiles, dtype=torch.int32, device=dev), tiles=tiles,
                       dense_index=strided_layout(every, dense_splits) if dense_splits > 1 else every,
                       dense_count=torch.zeros(1, 1, dense_splits, dtype=torch.int32, device=dev),
                       all_active=torch.ones(bsz, nq, dtype=torch.bool, device=dev), dense_splits=dense_splits,
                       win_idx=torch.zeros(w, dtype=torch.int64, device=dev),
                       win_bias=torch.zeros(w, **f32), splits=splits, keep_cap=keep_cap, signature=signature,
                       means_split=(torch.zeros(3, bsz, hkv, d, nkb_cap, dtype=torch.bfloat16, device=dev)
                                    if q.is_cuda and not cfg.outlier_keys
                                    else None),
                       n_dev=torch.zeros((), dtype=torch.int64, device=dev), count_table=table(keeps, splits),
                       dense_table=table(nkbs, dense_splits),
                       inner_out=torch.zeros(q.shape, **f32) if q.is_cuda else None,
                       inner_lse=torch.zeros(bsz, hq, nq, **f32) if q.is_cuda else None)

    def _begin_block(self, entry, n_prefix, epoch):
        """A block's first step, eager part: the prefix length into the entry (one device op; :meth:`_first`
        derives the kept counts, the key-block bias and the window from it)."""
        nkb = n_prefix // self.config.block_size
        keep = nkb if self.config.sparsity == 0.0 else self._keep(nkb)
        entry.n_prefix, entry.epoch, entry.ratio = n_prefix, epoch, (keep / nkb if nkb else 0.0)
        entry.n_dev.fill_(n_prefix)

    def _write_lengths(self, entry, nq):
        """The length-dependent state from ``entry.n_dev``, written in place on the device (eager or captured;
        one kernel on CUDA, ``losa_step.step_lengths``): the bias of the prefix's full key blocks, the kept counts
        per split (and per query tile), and the window's rows: the prefix's partial last block and the active
        block, gathered from the KV buffer inside the step (no copies per step); padding rows repeat the last
        valid row (rows past the keys may hold anything, even NaN) and are masked by the window's bias."""
        step_lengths(entry.n_dev, self.config.block_size, nq, entry.count_table, entry.dense_table, entry.bias,
                     entry.count, entry.count_tiles, entry.dense_count, entry.win_idx, entry.win_bias)

    def _first(self, q, kc, vc, *, entry, scale):
        """A block's first step, run eagerly or captured (fixed shapes for a capacity): dense prefix
        attention of every token over the prefix's full key blocks (capacity-sized ids, counts from the
        entry), the block mean keys of the capacity (zero past the prefix), the change test's references,
        the window attention and one fused pass that fills the row cache and merges. Returns (out, lse)."""
        bs = self.config.block_size
        self._write_lengths(entry, q.shape[2])
        count = entry.dense_count.expand(*entry.dense_index.shape[:3])
        split = (entry.dense_index, count, entry.dense_splits) if entry.dense_splits > 1 else None
        parts = prefix_partials(q, kc, vc, entry.dense_index, count, scale=scale, block_size=bs, split=split,
                                splits=1)
        # Reads the prefix's full blocks only (rows past it may hold anything, even NaN), and of those only the
        # ones whose last key changed since their mean was computed (a growing prefix: its newly full blocks); on
        # CUDA one kernel that also writes the three bfloat16 parts the union score reads.
        prefix_block_means(kc, entry.n_dev, bs, scale, entry.means_t, entry.means_split, last_keys=entry.last_keys)
        if entry.outliers_t is not None:
            d, nkb_cap = kc.shape[-1], entry.bias.shape[0]
            peaks = outlier_key_features(kc[:, :, : nkb_cap * bs], bs)[..., :d].mul_(scale).transpose(-1, -2)
            entry.outliers_t.copy_(torch.where(entry.bias == 0, peaks, 0.0))
        token_change_update(q, entry.q_ref, entry.ref_thr, self.config.threshold)  # the references only
        inner = window_attention(q, kc, vc, entry.win_idx, entry.win_bias, scale)
        return merge_prefix(parts.out, parts.lse, q.shape[2], inner, cache=(entry.out, entry.lse),
                            active=entry.all_active, out_dtype=q.dtype, pack=parts.pack)

    def dense_reason(self, q, k, *, causal=False) -> str | None:
        return prefix_block_reason(q, k, causal) or super().dense_reason(q, k, causal=causal)

    def sparse_attention(self, q, k, v, *, causal, scale, layer, frame_size, global_tokens, return_lse):
        nq, nk = q.shape[2], k.shape[2]
        cfg = self.config
        if causal or nk <= nq:
            return dense_attention(q, k, v, causal=causal, scale=scale, return_lse=return_lse)
        cap, kc = kv_capacity(k)
        vcap, vc = kv_capacity(v)
        if vcap != cap:
            cap, kc, vc = nk, k, v
        if cap < cfg.block_size + nq:  # not one full prefix key block, even at capacity: nothing to cache
            return dense_attention(q, k, v, scale=scale, return_lse=return_lse)
        state = step_state.current()
        self._cache.sync(state, clear=False)
        key = self._cache.key(layer, state)
        scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
        signature = (tuple(q.shape), q.dtype, k.dtype, q.device, tuple(k.shape[:2]) + (cap, k.shape[3]), scale)
        entry = self._cache.entries.get(key)
        if entry is None or entry.signature != signature:  # the capacity grew (or a new shape class)
            entry = self._cache.entries[key] = self._new_entry(q, cap, k.dtype, signature)
        if entry.epoch != self._cache.epoch or entry.n_prefix != nk - nq:
            self._begin_block(entry, nk - nq, self._cache.epoch)
            (out, lse), replayed = run_step(lambda *a: self._first(*a, entry=entry, scale=scale), entry.first, q,
                                            (kc, vc), self._cache, cfg.cuda_graphs)
            self.stats["full_refreshes"] += 1
            self._record(state, torch.ones(q.shape[0], nq + 1, dtype=torch.bool, device=q.device), 1.0)
            if replayed:
                out, lse = out.clone(), (lse.clone() if return_lse else lse)
            return (out, lse) if return_lse else out
        graphs = cfg.cuda_graphs
        if graphs is not False and cfg.selector is not None:
            if graphs and q.is_cuda:
                self._cache.warn_once("cuda_graphs: the registered-selector path gathers the active tokens "
                                      "(data-dependent shapes) and cannot be captured; running eager.")
            graphs = False
        (out, lse, stat), replayed = run_step(lambda *a: self._steady(*a, entry=entry, scale=scale), entry, q,
                                              (kc, vc), self._cache, graphs)
        ratio = entry.ratio
        if cfg.selector is not None:
            ratio = float(stat[1])
            stat = stat[0]
        self._record(state, stat, ratio)  # a replay's stat is read here, before the next replay
        if replayed:  # the graph's outputs are overwritten by its next replay
            out, lse = out.clone(), (lse.clone() if return_lse else lse)
        return (out, lse) if return_lse else out

    def _steady(self, q, kc, vc, *, entry, scale):
        """A cached step, run eagerly or captured: change test, union ranking, union-sparse partials over
        the prefix's full blocks (``kc, vc``: the whole KV buffer; the kept counts come from the entry),
        the window attention and one fused pass (split merge, row cache read/write, window merge). Fixed
        shapes for a capacity; the entry's tensors are updated in place. Returns ``(out, lse, stat)``."""
        cfg = self.config
        nq = q.shape[2]
        # |q - q_ref|^2 >= (threshold * |q_ref|)^2: token_change's test without a division or root; the
        # references move to this step's q (all tokens, or the active ones with compare_to="cached").
        active = token_change_update(q, entry.q_ref, entry.ref_thr, cfg.threshold,
                                     only_active=cfg.compare_to == "cached")  # (B, Nq)
        stat = None
        # Inside a CUDA graph capture the window (which the selection does not need) runs on a side stream: a
        # parallel branch of the graph beside the change test, score and ranking kernels, joined before the merge.
        side = step_cache.branch_stream(q)
        if side is None:
            inner = window_attention(q, kc, vc, entry.win_idx, entry.win_bias, scale)
        else:
            main = torch.cuda.current_stream(q.device)
            side.wait_stream(main)
            with torch.cuda.stream(side):
                inner = window_attention(q, kc, vc, entry.win_idx, entry.win_bias, scale,
                                         out=(entry.inner_out, entry.inner_lse))
        bs = cfg.block_size
        if cfg.selector is not None:  # eager only: data-dependent shapes
            p = (entry.n_prefix // bs) * bs
            if p:
                o, s_, extra = self._selector_prefix(q, active, kc[:, :, :p], vc[:, :, :p], scale)
            else:
                o, s_, extra = torch.zeros_like(q), torch.full(q.shape[:3], float("-inf"), device=q.device), 0.0
            parts = Partials(o[:, :, None], s_[:, :, None])
        else:
            index, rows, hkv = entry.index, None, kc.shape[1]
            if index is not None or cfg.union == "kv_head" or q.shape[1] == hkv:
                # The active rows first (and on CUDA the step's stat, in the same kernel): the union is scored
                # from them only and the same stacked rows go to the prefix attention.
                if q.is_cuda:
                    stacked, rank, n_rows, stat = active_first_order(q, active, hkv, bs)
                    rows = ActiveRows(stacked, rank, n_rows, q.shape[1] // hkv)
                else:
                    rows = active_first_rows(q, active, hkv, bs)
            if index is None and rows is not None:
                outliers = None if entry.outliers_t is None else entry.outliers_t.transpose(-1, -2)
                score = mean_key_score(rows.stacked, rows.n_rows, entry.means_t.transpose(-1, -2), entry.bias,
                                       split=entry.means_split, outliers=outliers, block_size=bs)
                # Laid out for the splits, each split's row once per query tile of the stacked rows; with
                # keep_sinks block 0 ranks first, so any prefix's count keeps it.
                index = rank_blocks(score, entry.keep_cap, entry.splits, first=cfg.keep_sinks, repeat=entry.tiles)
            elif index is None:
                index = mean_key_rank(q.float(), active, entry.means_t, entry.bias, entry.keep_cap, splits=entry.splits,
                                      keep_sinks=cfg.keep_sinks, outliers_t=entry.outliers_t, block_size=bs)
            if index.shape[1] in (1, hkv):  # one union per KV head: compute the active rows only
                count = entry.count_tiles.expand(*index.shape[:3])
                parts = active_first_partials(q, kc, vc, (index, count, entry.splits), active, scale=scale,
                                              block_size=bs, rows=rows)
            else:
                count = entry.count.expand(*index.shape[:3])
                parts = prefix_partials(q, kc, vc, index, count, scale=scale, block_size=bs,
                                        split=(index, count, entry.splits) if entry.splits > 1 else None, splits=1)
        if side is not None:
            main.wait_stream(side)
        out, lse = merge_prefix(parts.out, parts.lse, nq, inner, cache=(entry.out, entry.lse), active=active,
                                out_dtype=q.dtype, pack=parts.pack, rank=parts.rank)
        if stat is None:
            stat = torch.cat([active, active.any(dim=1, keepdim=True)], dim=1)
        return out, lse, ((stat, extra) if cfg.selector is not None else stat)
