"""Step-aware generation: run a diffusers video pipeline dense or sparse, timing every step and the attention
inside it (``generate``), and the reference block-diffusion loop (``block_diffusion``). Tiny random-weight
pipelines of every supported family are in :mod:`sparsediff.testing.tiny`."""

from .generate import GenerationResult, StepTimer, generate_video

__all__ = ["GenerationResult", "StepTimer", "generate_video"]
