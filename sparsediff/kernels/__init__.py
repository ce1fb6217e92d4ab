"""Kernels: block-sparse attention with LSE, block statistics, LSE merge, and their references.

Nothing here knows about models; see ``sparsediff.methods`` for the methods built on top.
"""

from .block_sparse import block_sparse_attention, resolve_backend, triton_available
from .block_stats import BlockStats, block_stats
from .masks import causal_block_mask, dense_index, index_to_mask, mask_to_index
from .merge import merge_attention

__all__ = [
    "BlockStats",
    "block_sparse_attention",
    "block_stats",
    "causal_block_mask",
    "dense_index",
    "index_to_mask",
    "mask_to_index",
    "merge_attention",
    "resolve_backend",
    "triton_available",
]
