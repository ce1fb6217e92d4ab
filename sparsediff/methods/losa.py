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

Selection: ``selector=None`` (default) scores each prefix key block by the active tokens' summed
softmax mass against the block's mean key (means cached at the block's first step, since the prefix
does not change within a block) and keeps the top ``(1 - sparsity)`` share per batch row and head.
The union-sparse attention then runs for the whole block in one call (its cost is the union's KV
read, shared by all queries) and only the active rows are kept: no device sync per step. A
registered selector name runs that selector on the gathered active tokens instead, and the union of
its per-query-block choices is used. Prefix attention is split over key chunks for short blocks
(``prefix_attention``).
"""

from __future__ import annotations

import dataclasses
import math

import torch

from ..kernels import block_stats, index_to_mask, mask_to_index, merge_attention
from . import step_state
from .base import AttentionMethod, MethodConfig, register_method
from .dense import dense_attention
from .flashblock import selector_config, split_prefix
from .prefix_attention import prefix_attention
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


def mean_key_union(q, active, key_means, keep, scale):
    """Built-in LoSA selection: per batch row and head, one set of ``keep`` prefix key blocks shared by
    all active tokens, ranked by the active tokens' mean softmax mass against the block mean keys.

    q ``(B, Hq, Nq, D)``, active bool ``(B, Nq)``, key_means ``(B, Hkv, nkb, D)``; returns a bool mask
    ``(B, Hq, nkb)``. Stable tokens carry no weight, so they cannot inflate the union.
    """
    bsz, hq, nq, d = q.shape
    hkv, nkb = key_means.shape[1], key_means.shape[2]
    # Query heads of one KV group share the key means: one matmul per group.
    logits = torch.matmul(q.float().reshape(bsz, hkv, (hq // hkv) * nq, d), key_means.transpose(-1, -2)) * scale
    probs = torch.softmax(logits, dim=-1).view(bsz, hq, nq, nkb)
    score = (probs * active[:, None, :, None]).sum(dim=2)
    top = torch.topk(score, keep, dim=-1).indices
    return torch.zeros_like(score, dtype=torch.bool).scatter_(-1, top, True)


@dataclasses.dataclass
class _Prefix:
    out: torch.Tensor  # (B, Hq, Nq, D) prefix attention per token
    lse: torch.Tensor  # (B, Hq, Nq) float32
    q_ref: torch.Tensor  # q the change is measured against
    key_means: torch.Tensor  # (B, Hkv, nkb, D) prefix block means: the prefix is fixed within a block
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
        # Kept as tensors (no device sync per call); step_report() converts.
        key = (state.block, state.step)
        rec = self.stats["per_step"].setdefault(key, {"block": state.block, "step": state.step, "calls": 0,
                                                       "active_share": 0.0, "union_density": 0.0})
        rec["active_share"] = rec["active_share"] + active_share
        rec["union_density"] = rec["union_density"] + union_density
        rec["calls"] += 1

    def step_report(self) -> list[dict]:
        """Per (block, step): share of active tokens and union density, averaged over layers."""
        return [{"block": r["block"], "step": r["step"], "layers": r["calls"],
                 "active_share": float(r["active_share"]) / r["calls"],
                 "union_density": float(r["union_density"]) / r["calls"]}
                for r in self.stats["per_step"].values()]

    def _keep(self, nkb):
        return max(1, min(nkb, round(nkb * (1.0 - self.config.sparsity))))

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

    def _active_prefix(self, q, active, entry, kp, vp, scale):
        """Prefix attention ``(out, lse)`` valid for the active tokens, and the union density.

        Built-in selection computes the union-sparse attention for all tokens of the block at once:
        the cost is the union's KV read, which the active tokens share, so the rows of stable tokens
        come almost free and no device sync is needed to gather the active ones.
        """
        cfg = self.config
        if cfg.sparsity == 0.0:
            out, lse = prefix_attention(q, kp, vp, scale=scale, block_size=cfg.block_size)
            return out, lse, active.any().float()
        if cfg.selector is not None:
            return self._selector_prefix(q, active, kp, vp, scale)
        nkb = entry.key_means.shape[2]
        keep = self._keep(nkb)
        scale_ = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
        union = mean_key_union(q, active, entry.key_means, keep, scale_)
        index, count = mask_to_index(union[:, :, None, :], max_kept=keep)
        out, lse = prefix_attention(q, kp, vp, index, count, scale=scale, block_size=cfg.block_size)
        return out, lse, active.any(dim=1).float().mean() * keep / nkb

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
            out, lse = prefix_attention(q, kp, vp, scale=scale, block_size=cfg.block_size)
            means = block_stats(kp, cfg.block_size).mean
            entry = _Prefix(out, lse, q.detach().clone(), means, signature)
            self._cache.entries[key] = entry
            self.stats["full_refreshes"] += 1
            self._record(state, 1.0, 1.0)
        else:
            active = token_change(q, entry.q_ref) >= cfg.threshold  # (B, Nq)
            out, lse, density = self._active_prefix(q, active, entry, kp, vp, scale)
            rows = active[:, None, :]
            entry.out = torch.where(rows[..., None], out, entry.out)
            entry.lse = torch.where(rows, lse, entry.lse)
            entry.q_ref = q.detach().clone() if cfg.compare_to == "last_step" else torch.where(
                rows[..., None], q, entry.q_ref)
            self._record(state, active.float().mean(), density)
        in_out, in_lse = dense_attention(q, kb, vb, scale=scale, return_lse=True)
        out, lse = merge_attention(entry.out, entry.lse, in_out, in_lse)
        return (out, lse) if return_lse else out
