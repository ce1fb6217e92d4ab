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
     shared by all of them (one union per batch row and KV head by default, ``union="head"``: per query
     head), so the KV read stays small; with
     ``sparsity == 0`` they get dense prefix attention.
  4. In-block attention (q vs the last ``Nq`` keys) is dense at every step; prefix and in-block parts
     merge by LSE.

A block's first step (new block, new prefix length, or first call) computes dense prefix attention
for every token. ``threshold == 0`` makes every token active; with ``sparsity == 0`` that is exact
dense attention. ``stats["per_step"]`` holds, per (block, step), the share of active tokens and the
union density (kept prefix key blocks / all prefix key blocks, mean over layers and heads).

Selection: ``selector=None`` (default) scores each prefix key block by the active tokens' summed
softmax mass against the block's mean key (means cached at the block's first step, since the prefix
does not change within a block) and keeps the top ``(1 - sparsity)`` share per batch row and (KV) head.
The union-sparse attention then runs in one call at a fixed shape: no device sync per step. With a
union per KV head (GQA, the default) the block's tokens are ordered active-first on the device and each
group's query heads stacked token-major (``prefix_attention.active_first_rows``): the union is scored from
the leading (active) rows only (``methods.losa.step_kernels.mean_key_score``: two kernels over chunks of key blocks
on CUDA), one read of each kept K/V block serves the whole group, and query tiles holding no active row skip
the prefix (``live_rows``: on the Gluon kernel also the half-tiles), so both follow the active share. The
change test and the next step's references are one kernel on CUDA too (``step_kernels.token_change_update``),
and so are the active-first order with the step's statistics, the ranking of the scored key blocks (laid out
for the splits and query tiles) and the window attention (``step_kernels``); inside a CUDA graph capture
the window runs on a parallel branch of the graph (``step_cache.branch_stream``). A block's first step writes
its length-dependent state and the block mean keys with one kernel each (``step_lengths``,
``prefix_block_means``); a block's mean is computed again only when its last key changed (a growing prefix:
its newly full blocks). With ``union="head"`` every row is scored and computed and only the active ones kept.
A registered selector name runs that selector on the gathered active tokens instead, and the union of its
per-query-block choices is used. Prefix attention is split over key chunks for short blocks
(``prefix_attention``; ``union_splits`` sets their number).

CUDA graphs (``cuda_graphs``: None, the default, uses them on CUDA inputs once two calls in a row found k/v in
the same buffer; True also warns where they cannot be used; False never; CPU inputs run eager): each layer's
first and cached steps are captured into CUDA graphs once and replayed (``step_cache.run_step``). The layer's
state is sized for the capacity of the KV buffer k/v are views of (``kv_capacity``) and rewritten in place at
each block's first step, so the graph survives blocks: re-captured only when the capacity, q's shape or the
dtype change. The active set is a mask and the union a ranked, capacity-sized index with kept counts on the
device, so shapes are fixed; the registered-selector path gathers the active tokens (data-dependent shapes)
and stays eager.
"""

from __future__ import annotations

from .config import LoSAConfig
from .method import LoSAMethod
from .reference import mean_key_rank, mean_key_union, rank_blocks, token_change

__all__ = ["LoSAConfig", "LoSAMethod", "mean_key_rank", "mean_key_union", "rank_blocks", "token_change"]
