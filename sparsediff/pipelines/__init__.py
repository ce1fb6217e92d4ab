"""Step-aware generation: run a diffusers video pipeline dense or sparse, timing every step and the
attention inside it; tiny random-weight pipelines of every supported family; ``sparsediff generate``."""

from ..testing.tiny import tiny_inputs, tiny_pipeline, tiny_transformer
from .generate import GenerationResult, StepTimer, generate_video

__all__ = ["GenerationResult", "StepTimer", "generate_video", "tiny_inputs", "tiny_pipeline", "tiny_transformer"]
