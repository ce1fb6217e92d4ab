"""Residual reuse across denoising steps: a method's sparse attention plus a cached ``dense - sparse`` term.

Consecutive denoising steps of a full-sequence model (a video DiT, a masked-diffusion LM without blocks) see
similar q, k and v, so what a sparse method misses changes slowly too. With ``config.residual_every = r``
(a field of every method's config; 0, the default, turns this off), per layer:

  * refresh step (the layer's first sparse step of a generation, then every ``r`` steps, and whenever the
    call's shapes change): the method's sparse attention and dense attention, both with their LSE; the
    residual ``(out_dense - out_sparse, lse_dense - lse_sparse)`` is cached and the dense result returned;
  * every other step: the method's sparse attention with the cached residual added,
    ``out = out_sparse + res_out``, ``lse = lse_sparse + res_lse``.

This is the residual of FlashBlock's combined mode (``methods/flashblock.py``, ``kernels/prefix_merge.py``):
at the refresh step sparse + residual is dense to rounding, and a later step with unchanged inputs is too.
As FlashBlock does, block-sparse methods (``block_sparse``, ``ba_att``) keep the refresh step's plan (kept
blocks and BA-Att's key order) with the residual and only rerun the kernel on the new q, k, v in between: the
residual then describes the blocks that are still dropped. Selecting again each step would let blocks enter
or leave the set (and BA-Att's norm sort move keys between blocks) under a residual made for the old set;
on the video probe that costs BA-Att at sparsity 0.8 most of the gain (docs/results/residual_reuse_probe).
It also saves the selection's cost on the reuse steps. SparseD reuses its own cached pattern anyway; other
methods run their ``sparse_attention`` as usual.

A call that the method itself answers exactly (SparseD's switch step returns its dense pass) is recognised by
the method's ``stats["sparse_calls"]`` counter not moving: nothing is cached and the next sparse step
refreshes. Methods that do not keep that counter are taken to run sparse on every call.

Entries are per layer and per call of the layer within a step: a host that runs classifier-free guidance as
two calls per step (the conditional pass, then the unconditional one) gets a residual for each, in that order.
Without step information (``step_state.current().step is None``) calls run plain sparse attention: there is
no schedule to refresh on. The cache, kept on the method, is dropped when the method is reset (a new
generation: ``AttentionMethod.__call__`` resets it, which replaces ``method.stats``) and at a block change.
``method.stats`` reports ``residual_refreshes``, ``residual_reuses`` and ``residual_bytes`` (device memory
held: per layer ``B * Hq * Nq * (D * itemsize + 4)`` bytes for the residual output, in the output's dtype,
and its float32 LSE, plus the kept plan: block ids and, for BA-Att, an int64 key order ``B * Hkv * Nk * 8``).

``config.plan_every = r`` keeps only the plan: the refresh step selects and runs sparse (no dense pass, no
residual), the steps between run the kernel on the kept plan. It saves the selection's cost on those steps at
the price of blocks chosen on slightly older inputs (``plan_refreshes`` / ``plan_reuses`` in ``method.stats``);
methods without a plan (SparseD, FlashBlock, LoSA keep their own patterns) reject the field.

The reuse path is the kernel on the cached plan (or the method's sparse call) plus two additions: no host
synchronisation; at a refresh of a layer whose shapes did not change, the residual and plan are written into
the tensors already cached (in place) where their shapes match, so CUDA graphs that read them stay valid.
"""

from __future__ import annotations

import dataclasses
import logging

import torch

from .._logging import warn_once
from ..runtime import step_state
from ..runtime.step_cache import LayerCache, stale
from .dense import dense_attention
from .sparse_plan import SparsePlan

logger = logging.getLogger(__name__)

CACHE_ATTR = "_residual_cache"
PLAN_CACHE_ATTR = "_plan_cache"


@dataclasses.dataclass(eq=False)
class ResidualEntry:
    """One layer's cached residual, and the block-sparse plan it was made against (None: the method selects)."""

    out: torch.Tensor | None  # (B, Hq, Nq, D) dense - sparse output, in the output's dtype (None: plan only)
    lse: torch.Tensor | None  # (B, Hq, Nq) float32 dense - sparse LSE
    step: int  # the refresh step
    signature: tuple  # shapes and flags the residual belongs to
    block_index: torch.Tensor | None = None
    block_count: torch.Tensor | None = None
    perm: torch.Tensor | None = None  # the key order the block ids refer to (None: the keys' own)
    block_size: int | None = None


class ResidualCache:
    """Per-layer residuals of one method, for one generation."""

    def __init__(self):
        self.layers = LayerCache("residual_every")
        self.generation = step_state.current().generation
        self.stats = None  # the method's stats dict it last saw: a reset replaces it
        self._mark, self._calls = None, {}  # calls of each layer within the current step

    def sync(self, method) -> None:
        """Drop every entry if the method was reset or a new generation started since the last call."""
        state = step_state.current()
        if method.stats is not self.stats or state.generation != self.generation:
            self.layers.clear()
            self.stats, self.generation = method.stats, state.generation
        self.layers.sync(state)  # a block change (block diffusion): the residuals belong to the old block

    def name(self, layer, state) -> str:
        """The entry of this call: ``layer``, then ``layer#1``, ``layer#2`` ... for further calls of the layer
        within one step (classifier-free guidance run as two calls: the conditional and unconditional passes
        keep residuals of their own). Without ``layer``: the call's order within the step."""
        if layer is None:
            return self.layers.key(None, state)
        mark = (state.generation, state.block, state.step)
        if mark != self._mark:
            self._mark, self._calls = mark, {}
        seen = self._calls.get(layer, 0)
        self._calls[layer] = seen + 1
        return layer if seen == 0 else f"{layer}#{seen}"

    def nbytes(self) -> int:
        return self.layers.nbytes()


def residual_cache(method, attr: str = CACHE_ATTR) -> ResidualCache:
    cache = getattr(method, attr, None)
    if cache is None:
        cache = ResidualCache()
        setattr(method, attr, cache)
    return cache


def residual_bytes(method) -> int:
    """Device memory held by ``method``'s cached residuals and plans."""
    cache = getattr(method, CACHE_ATTR, None)
    return 0 if cache is None else cache.nbytes()


def add_residual(out, lse, res_out, res_lse):
    """``sparse ⊕ residual``: ``(out + res_out, lse + res_lse)``, the sum in at least float32."""
    acc = torch.promote_types(out.dtype, torch.float32)
    return (out.to(acc) + res_out.to(acc)).to(out.dtype), lse + res_lse


def _planner(method, nk):
    """The block-sparse method that runs a call with ``nk`` keys when ``method`` computes its sparse product
    as plan + kernel (``BlockSparseMethod`` and BA-Att), else None."""
    return method.residual_planner(nk)


def _planned(planner, q, k, v, entry, *, causal, scale, layer, frame_size, global_tokens):
    """``((out, lse), plan)`` of the plan's kernel: a fresh plan when ``entry`` is None, else the entry's on the
    current keys and values."""
    if entry is None:
        plan = planner.plan(q, k, v, causal=causal, scale=scale, frame_size=frame_size, global_tokens=global_tokens,
                            layer=layer)
    else:
        kp, vp = k, v
        if entry.perm is not None:
            from ..kernels.block_stats.permute import gather_rows

            kp, vp = gather_rows(k, v, entry.perm)
        plan = SparsePlan(kp, vp, entry.block_index, entry.block_count, entry.perm, entry.block_size)
    planner._count_kept(plan.block_count, q, k, causal, layer)
    return planner.attend(q, plan, causal=causal, scale=scale, return_lse=True), plan


def _keep(held, new):
    """``new`` written into ``held`` when their layouts match (captured graphs keep reading ``held``), else ``new``."""
    if held is None or new is None or held.shape != new.shape or held.dtype != new.dtype:
        return new
    return held.copy_(new)


def _signature(q, k, v, causal, scale, global_tokens) -> tuple:
    return (tuple(q.shape), tuple(k.shape), tuple(v.shape), q.dtype, q.device, bool(causal), scale,
            int(global_tokens))


def _entry(cache, name, signature):
    """The layer's cached entry, or None (none yet, or made for other shapes: dropped)."""
    entry = cache.layers.entries.get(name)
    if entry is not None and entry.signature != signature:
        del cache.layers.entries[name]
        entry = None
    return entry


def _store(cache, name, new, fields) -> None:
    """Cache ``new``, written into the layer's previous entry's tensors where their layouts match."""
    held = cache.layers.entries.get(name)
    if held is not None:
        for field in fields:
            setattr(new, field, _keep(getattr(held, field), getattr(new, field)))
    cache.layers.entries[name] = new


def attend_with_kept_plan(method, q, k, v, *, causal, scale, layer, frame_size, global_tokens, return_lse):
    """One call of ``method`` selecting blocks only every ``method.config.plan_every`` steps (module docstring)."""
    kwargs = dict(causal=causal, scale=scale, layer=layer, frame_size=frame_size, global_tokens=global_tokens)
    state = step_state.current()
    planner = _planner(method, k.shape[2])
    if planner is None or state.step is None:  # no plan to keep, or no steps to keep it across
        why = (f"{method.name} computes no block-sparse plan" if planner is None else
               "calls carry no denoising step (use sparsediff.denoising_step or a step-tracking host)")
        warn_once(logger, f"plan_every={method.config.plan_every} has no effect: {why}; every call selects",
                  key=("plan_every", method.name, planner is None))
        return method.sparse_attention(q, k, v, **kwargs, return_lse=return_lse)
    cache = residual_cache(method, PLAN_CACHE_ATTR)
    cache.sync(method)
    name = cache.name(layer, state)
    signature = _signature(q, k, v, causal, scale, global_tokens)
    entry = _entry(cache, name, signature)
    refresh = entry is None or stale(entry.step, state.step, method.config.plan_every)
    (out, lse), plan = _planned(planner, q, k, v, None if refresh else entry, **kwargs)
    stats = method.stats
    if refresh:
        new = ResidualEntry(None, None, state.step, signature, plan.block_index, plan.block_count, plan.perm,
                            plan.block_size)
        _store(cache, name, new, ("block_index", "block_count", "perm"))
        stats["plan_refreshes"] = stats.get("plan_refreshes", 0) + 1
        stats["plan_bytes"] = cache.nbytes()
    else:
        stats["plan_reuses"] = stats.get("plan_reuses", 0) + 1
    return (out, lse) if return_lse else out


def attend_with_residual(method, q, k, v, *, causal, scale, layer, frame_size, global_tokens, return_lse):
    """One call of ``method`` with residual reuse every ``method.config.residual_every`` steps (module
    docstring); returns what ``method.sparse_attention`` returns for ``return_lse``."""
    every = method.config.residual_every
    kwargs = dict(causal=causal, scale=scale, layer=layer, frame_size=frame_size, global_tokens=global_tokens)
    state = step_state.current()
    if not every or state.step is None:
        return method.sparse_attention(q, k, v, **kwargs, return_lse=return_lse)
    cache = residual_cache(method)
    cache.sync(method)
    name = cache.name(layer, state)
    signature = _signature(q, k, v, causal, scale, global_tokens)
    entry = _entry(cache, name, signature)
    refresh = entry is None or stale(entry.step, state.step, every)
    planner = _planner(method, k.shape[2])
    stats = method.stats
    if not refresh:
        if planner is not None and entry.block_index is not None:
            (out, lse), _ = _planned(planner, q, k, v, entry, **kwargs)
        else:
            out, lse = method.sparse_attention(q, k, v, **kwargs, return_lse=True)
        stats["residual_reuses"] = stats.get("residual_reuses", 0) + 1
        out, lse = add_residual(out, lse, entry.out, entry.lse)
        return (out, lse) if return_lse else out

    plan = None
    if planner is not None:
        (out, lse), plan = _planned(planner, q, k, v, None, **kwargs)
    else:
        before = stats.get("sparse_calls")
        out, lse = method.sparse_attention(q, k, v, **kwargs, return_lse=True)
        if "sparse_calls" in stats and stats["sparse_calls"] == (before or 0):
            return (out, lse) if return_lse else out  # the method answered exactly (SparseD's switch step)
    dense_out, dense_lse = dense_attention(q, k, v, causal=causal, scale=scale, return_lse=True)
    # Differences of the unrounded values, kept at the output's precision: their rounding is relative to the
    # residual, not to the output. Rows that see no key have -inf LSEs on both sides: residual 0 there.
    acc = torch.promote_types(out.dtype, torch.float32)
    res_out = (dense_out.to(acc) - out.to(acc)).to(out.dtype)
    res_lse = torch.nan_to_num(dense_lse.float() - lse.float(), nan=0.0, posinf=0.0, neginf=0.0)
    new = ResidualEntry(res_out, res_lse, state.step, signature)
    if plan is not None:
        new.block_index, new.block_count, new.perm, new.block_size = (plan.block_index, plan.block_count, plan.perm,
                                                                      plan.block_size)
    _store(cache, name, new, ("out", "lse", "block_index", "block_count", "perm"))
    stats["residual_refreshes"] = stats.get("residual_refreshes", 0) + 1
    stats["residual_bytes"] = cache.nbytes()
    return (dense_out, dense_lse) if return_lse else dense_out
