"""LoSA: locality-aware sparse attention for block diffusion (prefix + active block).

Call convention as FlashBlock: q = the active block's ``Nq`` tokens, k/v = ``[prefix | active block]``,
not causal. Per layer and step:

  1. Each active-block token's *change* is the relative L2 change of its query vector (all query
     heads of the token concatenated) since the last step. The paper measures the token's hidden
     state; a method only sees q, k, v, and q is a linear image of that (normalised) hidden state,
     so it moves when the hidden state moves.
  2. Tokens with change ``< threshold`` are *stable*: they reuse their cached prefix attention
     (output and LSE). The others are *active*.
  3. Active tokens get sparse prefix attention. Key blocks are chosen for the active tokens only and
     shared by all of them (one union per batch row and head), so the KV read stays small; with
     ``sparsity == 0`` they get dense prefix attention.
  4. In-block attention (q vs the last ``Nq`` keys) is dense at every step; prefix and in-block parts
     merge by LSE.

A block's first step (new block, new prefix length, or first call) computes dense prefix attention
for every token. ``threshold == 0`` makes every token active; with ``sparsity == 0`` that is exact
dense attention. ``stats["per_step"]`` holds, per (block, step), the share of active tokens and the
union density (kept prefix key blocks / all prefix key blocks, mean over layers and heads).

Selection: ``selector=None`` (default) scores each prefix key block by the active tokens' mean
softmax mass against the block's mean key (one (Na x n_blocks) product per head) and keeps the top
``(1 - sparsity)`` share; a registered selector name runs that selector on the active tokens instead
and the union of its per-query-block choices is used.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from ..kernels import block_sparse_attention, block_stats, index_to_mask, mask_to_index, merge_attention
from . import step_state
from .base import AttentionMethod, MethodConfig, register_method
from .dense import dense_attention
from .flashblock import selector_config, split_prefix
from .selectors import get_selector
from .step_cache import LayerCache


@dataclasses.dataclass
class LoSAConfig(MethodConfig):
    """LoSA settings (our defaults; the change is measured on q, see the module docstring)."""

    threshold: float = 0.05  # relative L2 change of q below which a token is stable
    sparsity: float = 0.8  # share of prefix key blocks skipped by active tokens
    selector: str | None = None  # None: built-in mean-key scoring; else a registered selector name
    compare_to: str = "last_step"  # or "cached": change since the step its prefix attention was computed

    def __post_init__(self):
        super().__post_init__()
        if not float(self.threshold) >= 0.0:
            raise ValueError(f"threshold must be >= 0, got {self.threshold!r}")
        if not 0.0 <= float(self.sparsity) < 1.0:
            raise ValueError(f"sparsity must lie in [0, 1), got {self.sparsity!r}")
        if self.compare_to not in ("last_step", "cached"):
            raise ValueError(f"compare_to must be 'last_step' or 'cached', got {self.compare_to!r}")
        if self.selector is not None:
            get_selector(self.selector)


def token_change(q_now, q_ref):
    """Relative L2 change per token ``(B, Nq)``, over all query heads of the token."""
    diff = (q_now.float() - q_ref.float()).square().sum(dim=(1, 3))
    ref = q_ref.float().square().sum(dim=(1, 3))
    return torch.sqrt(diff / ref.clamp_min(1e-12))


def mean_key_union(q_act, kp, keep, block_size, scale):
    """Built-in LoSA selection: one set of ``keep`` key blocks per head for all active tokens, ranked by
    their mean softmax mass against the block mean keys. Returns a bool mask ``(1, Hq, nkb)``."""
    hq, hkv = q_act.shape[1], kp.shape[1]
    means = block_stats(kp, block_size).mean.repeat_interleave(hq // hkv, dim=1)  # (1, Hq, nkb, D)
    probs = torch.softmax(torch.matmul(q_act.float(), means.transpose(-1, -2)) * scale, dim=-1)
    score = probs.mean(dim=2)  # (1, Hq, nkb)
    top = torch.topk(score, keep, dim=-1).indices
    return torch.zeros_like(score, dtype=torch.bool).scatter_(-1, top, True)


@dataclasses.dataclass
class _Prefix:
    out: torch.Tensor  # (B, Hq, Nq, D) prefix attention per token
    lse: torch.Tensor  # (B, Hq, Nq) float32
    q_ref: torch.Tensor  # q the change is measured against
    signature: tuple


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

    def _record(self, state, active_share, union_density):
        key = (state.block, state.step)
        rec = self.stats["per_step"].setdefault(key, {"block": state.block, "step": state.step, "calls": 0,
                                                       "active_share": 0.0, "union_density": 0.0})
        n = rec["calls"]
        rec["active_share"] = (rec["active_share"] * n + active_share) / (n + 1)
        rec["union_density"] = (rec["union_density"] * n + union_density) / (n + 1)
        rec["calls"] = n + 1

    def step_report(self) -> list[dict]:
        """Per (block, step): share of active tokens and union density, averaged over layers."""
        return list(self.stats["per_step"].values())

    def _union_mask(self, q_act, kp, scale):
        """Kept prefix key blocks ``(1, Hq, nkb)`` for the active tokens of one batch row."""
        cfg = self.config
        nkb = math.ceil(kp.shape[2] / cfg.block_size)
        keep = max(1, min(nkb, round(nkb * (1.0 - cfg.sparsity))))
        if cfg.selector is None:
            scale = 1.0 / math.sqrt(q_act.shape[-1]) if scale is None else scale
            return mean_key_union(q_act, kp, keep, cfg.block_size, scale)
        sel_cfg = selector_config(cfg.selector, cfg, cfg.sparsity, cfg.block_size)
        index, count = get_selector(cfg.selector)(q_act, kp, sel_cfg, causal=False, scale=scale)
        sel_block = getattr(sel_cfg, "block_size", cfg.block_size)
        if sel_block != cfg.block_size:
            raise ValueError(f"selector {cfg.selector!r} uses block_size {sel_block}, LoSA {cfg.block_size}")
        mask = index_to_mask(index, count, nkb).expand(1, q_act.shape[1], -1, -1)
        return mask.any(dim=2)

    def _active_prefix(self, q_act, kp, vp, scale):
        """Prefix attention of the active tokens of one batch row, and the union density."""
        cfg = self.config
        if cfg.sparsity == 0.0:
            out, lse = dense_attention(q_act, kp, vp, scale=scale, return_lse=True)
            return out, lse, 1.0
        union = self._union_mask(q_act, kp, scale)  # (1, Hq, nkb)
        index, count = mask_to_index(union[:, :, None, :])
        nqb = math.ceil(q_act.shape[2] / cfg.block_size)
        # One row of ids serves every query block (stride 0): the shared union is the point.
        index, count = index.expand(-1, -1, nqb, -1), count.expand(-1, -1, nqb)
        out, lse = block_sparse_attention(q_act, kp, vp, index, count, scale=scale, block_size=cfg.block_size,
                                          return_lse=True, check_ids=False)
        return out, lse, float(union.float().mean())

    def sparse_attention(self, q, k, v, *, causal, scale, layer, frame_size, global_tokens, return_lse):
        nq, nk = q.shape[2], k.shape[2]
        if causal or nk <= nq:
            return dense_attention(q, k, v, causal=causal, scale=scale, return_lse=return_lse)
        cfg = self.config
        state = step_state.current()
        self._cache.sync(state)
        key = self._cache.key(layer, state)
        signature = (tuple(q.shape), tuple(k.shape), q.dtype, q.device, scale)
        kp, vp, kb, vb = split_prefix(k, v, nq)
        entry = self._cache.entries.get(key)
        if entry is None or entry.signature != signature:
            out, lse = dense_attention(q, kp, vp, scale=scale, return_lse=True)
            entry = _Prefix(out, lse, q.detach().clone(), signature)
            self._cache.entries[key] = entry
            self.stats["full_refreshes"] += 1
            self._record(state, 1.0, 1.0)
        else:
            active = token_change(q, entry.q_ref) >= cfg.threshold  # (B, Nq)
            densities = []
            for b in range(q.shape[0]):
                ids = active[b].nonzero().squeeze(1)
                if ids.numel() == 0:
                    continue
                out_b, lse_b, density = self._active_prefix(q[b : b + 1, :, ids], kp[b : b + 1], vp[b : b + 1],
                                                            scale)
                entry.out[b, :, ids] = out_b[0]
                entry.lse[b, :, ids] = lse_b[0]
                if cfg.compare_to == "cached":
                    entry.q_ref[b, :, ids] = q[b, :, ids]
                densities.append(density)
            if cfg.compare_to == "last_step":
                entry.q_ref.copy_(q)
            share = float(active.float().mean())
            self._record(state, share, sum(densities) / q.shape[0])
        in_out, in_lse = dense_attention(q, kb, vb, scale=scale, return_lse=True)
        out, lse = merge_attention(entry.out, entry.lse, in_out, in_lse)
        return (out, lse) if return_lse else out
