"""Where the current attention call sits in generation: denoising step, total steps, block.

Hosts feed it: diffusers pipelines through their step callback, hand-written loops through
``with denoising_step(i, total):``, block-diffusion loops through ``new_block``. Methods read it to
run dense early steps (all methods) and to reuse or reset caches (SparseD, FlashBlock, LoSA).
A new generation bumps ``generation`` so that methods drop per-generation caches lazily.
"""

from __future__ import annotations

import contextlib
import dataclasses


@dataclasses.dataclass
class StepState:
    step: int | None = None  # 0-based denoising step, None outside a step-aware loop
    total_steps: int | None = None
    block: int | None = None  # 0-based block index in block diffusion
    generation: int = 0

    def is_dense_step(self, dense_steps: int = 0, dense_step_fraction: float = 0.0) -> bool:
        """True while the schedule asks for full attention (the first steps)."""
        if self.step is None:
            return False
        if self.step < dense_steps:
            return True
        return self.total_steps is not None and self.step < dense_step_fraction * self.total_steps


_state = StepState()


def current() -> StepState:
    return _state


def set_step(step: int | None, total_steps: int | None = None) -> None:
    _state.step, _state.total_steps = step, total_steps


def new_generation() -> int:
    """Start a new generation: methods clear caches tied to the previous one."""
    _state.generation += 1
    _state.step = _state.total_steps = _state.block = None
    return _state.generation


def new_block(block: int) -> None:
    """Start denoising block ``block`` (block diffusion): per-block caches reset."""
    _state.block = block
    _state.step = None


@contextlib.contextmanager
def denoising_step(step: int, total_steps: int | None = None):
    """``with sparsediff.denoising_step(i, total):`` around one denoising step of a custom loop."""
    previous = (_state.step, _state.total_steps)
    set_step(step, total_steps)
    try:
        yield _state
    finally:
        _state.step, _state.total_steps = previous


@contextlib.contextmanager
def generation():
    """Marks one whole generation: a fresh generation id on entry, step info cleared on exit."""
    new_generation()
    try:
        yield _state
    finally:
        _state.step = _state.total_steps = _state.block = None
