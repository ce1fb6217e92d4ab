"""sparsediff: long-context sparse attention for diffusion models, as a drop-in.

Public names are resolved lazily so that ``import sparsediff`` stays cheap and optional hosts
(diffusers, transformers) are imported only when used.
"""

from __future__ import annotations

import importlib
import sys

__version__ = "0.1.0"

_EXPORTS = {
    # kernels
    "block_sparse_attention": "sparsediff.kernels",
    "block_stats": "sparsediff.kernels",
    "merge_attention": "sparsediff.kernels",
    "mask_to_index": "sparsediff.kernels",
    "index_to_mask": "sparsediff.kernels",
    # method API and step state
    "make_method": "sparsediff.methods",
    "available_methods": "sparsediff.methods",
    "denoising_step": "sparsediff.methods",
    "new_generation": "sparsediff.methods",
    "generation": "sparsediff.methods",
    "new_block": "sparsediff.methods",
    # methods
    "BAAttConfig": "sparsediff.methods.ba_att",
    "ba_attention": "sparsediff.methods.ba_att",
    "select_blocks": "sparsediff.methods.ba_att",
    "SparseDConfig": "sparsediff.methods.sparsed",
    "FlashBlockConfig": "sparsediff.methods.flashblock",
    "LoSAConfig": "sparsediff.methods.losa",
    # diffusers processors
    "BAAttProcessor": "sparsediff.attention_processors",
    "SparseDProcessor": "sparsediff.attention_processors",
    "FlashBlockProcessor": "sparsediff.attention_processors",
    "BlockSparseProcessor": "sparsediff.attention_processors",
    "SparseAttnProcessor": "sparsediff.attention_processors",
    "DenseProcessor": "sparsediff.attention_processors",
    "CaptureConfig": "sparsediff.attention_processors",
    "BAAttMethod": "sparsediff.methods.ba_att",
    "BlockSparseConfig": "sparsediff.methods.block_sparse",
    "BlockSparseMethod": "sparsediff.methods.block_sparse",
    # transformers
    "SparseAttentionConfig": "sparsediff.hooks",
    # enable / disable on any supported host
    "enable": "sparsediff.api",
    "disable": "sparsediff.api",
}

__all__ = ["__version__", *_EXPORTS]


if "transformers" in sys.modules:
    # transformers is already loaded: register attn_implementation="ba_att" etc. now (cheap). Otherwise
    # `import sparsediff.hooks` (or sparsediff.enable) registers them without paying for transformers here.
    importlib.import_module("sparsediff.hooks")


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'sparsediff' has no attribute {name!r}")
