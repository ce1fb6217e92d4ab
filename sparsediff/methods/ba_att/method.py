"""The BA-Att method: plan (sort, score, select) and the block-sparse kernel, and the one-call ``ba_attention``."""

from __future__ import annotations

from ..._logging import warn_once
from ..base import register_method
from ..block_sparse import BlockSparseMethod, SparsePlan
from . import segment_sort
from .config import BAAttConfig, logger
from .scores import _query_coefficients, _select
from .sort import _sort_keys


@register_method
class BAAttMethod(BlockSparseMethod):
    """BA-Att behind the method API: norm sorting, BA-Att selection, block-sparse kernel."""

    name = "ba_att"
    config_class = BAAttConfig

    def _segment(self, causal, frame_size):
        """The sort segment (an int, or None for the whole sequence), or False when nothing is sorted."""
        cfg = self.config
        segment = cfg.sort_segment if cfg.sort_segment is not None else frame_size
        if cfg.sorts_keys and causal and segment is not None:
            warn_once(logger, "BA-Att: norm sorting is off under causal masking (the kernel masks by key position, and "
                       "sorting would move keys across the causal boundary); keys keep their order")
        if not cfg.sorts_keys or causal or segment is None:
            return False
        if segment != "sequence" and segment <= cfg.block_size:
            return False  # segments within one block (a tile of the tiled layout): sorting moves no key across blocks
        return None if segment == "sequence" else segment

    def prepare_kv(self, q, k, v, *, causal, frame_size, global_tokens):
        segment = self._segment(causal, frame_size)
        if segment is False:
            return k, v, None
        # BA-Att's pooled estimator reuses the sorted keys' block statistics from the gather.
        bs = self.config.block_size if self._pooled_selector() else None
        return _sort_keys(k, v, segment=segment, start=min(global_tokens, k.shape[2]), block_size=bs)

    def _pooled_selector(self) -> bool:
        return self.config.selector == "ba_att" and self.config.estimator == "pooled"

    def plan(self, q, k, v, *, causal=False, scale=None, frame_size=None, global_tokens=0, layer=None):
        """As the base class (sort -> select), but with BA-Att's pooled estimator the sort's launch also writes
        the query features (same bits as the selector's own kernel), saving the selector that read of q."""
        cfg = self.config
        segment = self._segment(causal, frame_size)
        if self.for_keys(k.shape[2]) is not self or segment is False or not self._pooled_selector() \
                or not segment_sort.FUSE_QUERY_FEATURES:
            return super().plan(q, k, v, causal=causal, scale=scale, frame_size=frame_size,
                                global_tokens=global_tokens, layer=layer)
        query = (q, *_query_coefficients(q.shape[-1], cfg.beta, scale))
        ks, vs, perm, right, left = _sort_keys(k, v, segment=segment, start=min(global_tokens, k.shape[2]),
                                               block_size=cfg.block_size, query=query)
        index, count = _select(q, ks, cfg, causal=causal, scale=scale, global_tokens=global_tokens, k_stats=right,
                               sorted_keys=right is not None, q_features=left, layer=layer)
        return SparsePlan(ks, vs, index, count, perm, cfg.block_size)

    def select(self, q, k, *, causal, scale, global_tokens, k_stats=None, layer=None):
        if self.config.selector != "ba_att":
            return super().select(q, k, causal=causal, scale=scale, global_tokens=global_tokens, layer=layer)
        # The method passes the sorted keys' statistics exactly when it norm-sorted them (prepare_kv).
        return _select(q, k, self.config, causal=causal, scale=scale, global_tokens=global_tokens, k_stats=k_stats,
                       sorted_keys=k_stats is not None, layer=layer)


def ba_attention(q, k, v, config=None, return_lse=False, *, causal=False, scale=None, frame_size=None,
                 global_tokens=0):
    """BA-Att attention: sort -> stats -> scores -> select -> block-sparse kernel.

    q ``(B, Hq, Nq, D)``, k and v ``(B, Hkv, Nk, D)``. Unlike the method object, this always runs the
    sparse path (no ``min_seq_len`` or dense-step fallback). Returns ``out`` or ``(out, lse)``.
    """
    config = BAAttConfig() if config is None else config
    if not isinstance(config, BAAttConfig):
        raise TypeError(f"ba_attention takes a BAAttConfig, got {type(config).__name__}")
    method = BAAttMethod(config)
    return method.sparse_attention(q, k, v, causal=causal, scale=scale, layer=None, frame_size=frame_size,
                                   global_tokens=global_tokens, return_lse=return_lse)
