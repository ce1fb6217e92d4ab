"""The four methods as tensor functions with their config dataclasses, and the shared method API."""

from ..runtime.step_state import StepState, denoising_step, generation, new_block, new_generation, set_step
from .base import AttentionMethod, DenseMethod, MethodConfig, available_methods, make_method, register_method
from .dense import dense_attention
from .selectors import available_selectors, get_selector, register_selector

__all__ = [
    "AttentionMethod",
    "DenseMethod",
    "MethodConfig",
    "StepState",
    "available_methods",
    "available_selectors",
    "denoising_step",
    "dense_attention",
    "generation",
    "get_selector",
    "make_method",
    "new_block",
    "new_generation",
    "register_method",
    "register_selector",
    "set_step",
]
