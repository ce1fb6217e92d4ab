"""Diffusers integration: attention processors running sparsediff methods, and ``enable_diffusers``.

    pipe.transformer.set_attn_processor(BAAttProcessor(sparsity=0.5))   # or
    sparsediff.enable(pipe, "ba_att", sparsity=0.5)                     # + layer names, step tracking
    sparsediff.disable(pipe)                                            # original processors back
"""

from .enable import StepTracker, disable_diffusers, enable_diffusers, enabled_processor, transformers_of
from .families import CallPlan, call_plan, model_family
from .processor import (
    BAAttProcessor,
    BlockSparseProcessor,
    CaptureConfig,
    DenseProcessor,
    FlashBlockProcessor,
    SparseAttnProcessor,
    SparseDProcessor,
    attention_timer,
)

__all__ = [
    "BAAttProcessor",
    "BlockSparseProcessor",
    "CallPlan",
    "CaptureConfig",
    "DenseProcessor",
    "FlashBlockProcessor",
    "SparseAttnProcessor",
    "SparseDProcessor",
    "StepTracker",
    "attention_timer",
    "call_plan",
    "disable_diffusers",
    "enable_diffusers",
    "enabled_processor",
    "model_family",
    "transformers_of",
]
