"""One video generation through a diffusers pipeline, with per-step wall time and attention time.

The method runs through :func:`sparsediff.attention_processors.enable_diffusers`, whose forward hook
advances ``step_state`` from the pipeline's timesteps (dense early steps, step-keyed caches); the
pipeline's ``callback_on_step_end`` only stamps times. A dense baseline runs through the same route
(``DenseProcessor``) so that its attention time is measured the same way.
"""

from __future__ import annotations

import dataclasses
import inspect
import time

import numpy as np
import torch

from ..attention_processors import DenseProcessor, attention_timer, disable_diffusers, enable_diffusers
from ..runtime import step_state


@dataclasses.dataclass
class GenerationResult:
    frames: np.ndarray  # (T, H, W, 3) float in [0, 1]
    step_seconds: list
    attention_seconds: list  # attention time inside each step
    total_seconds: float
    processor: dict

    @property
    def attention_share(self) -> float:
        spent = sum(self.step_seconds)
        return sum(self.attention_seconds) / spent if spent else 0.0

    @property
    def median_step_seconds(self) -> float:
        return float(np.median(self.step_seconds)) if self.step_seconds else 0.0

    @property
    def median_attention_seconds(self) -> float:
        return float(np.median(self.attention_seconds)) if self.attention_seconds else 0.0

    def summary(self) -> dict:
        return {"processor": self.processor, "total_seconds": self.total_seconds,
                "median_step_seconds": self.median_step_seconds,
                "median_step_attention_seconds": self.median_attention_seconds,
                "denoising_seconds": sum(self.step_seconds), "attention_seconds": sum(self.attention_seconds),
                "attention_share": self.attention_share, "step_seconds": self.step_seconds,
                "step_attention_seconds": self.attention_seconds}


class StepTimer:
    """A ``callback_on_step_end`` that records each step's wall time and the attention time in it."""

    def __init__(self, attention_box, device=None):
        self.box, self.device = attention_box, device
        self.step_seconds, self.attention_seconds = [], []
        self._last = self._last_attention = None

    def start(self):
        self._sync()
        self._last, self._last_attention = time.perf_counter(), self.box[0]

    def _sync(self):
        if self.device is not None and torch.device(self.device).type == "cuda":
            torch.cuda.synchronize(self.device)

    def __call__(self, pipe, step, timestep, callback_kwargs):
        self._sync()
        now = time.perf_counter()
        self.step_seconds.append(now - self._last)
        self.attention_seconds.append(self.box[0] - self._last_attention)
        self._last, self._last_attention = now, self.box[0]
        return callback_kwargs


def frames_per_latent(pipe) -> int:
    """Video frames one latent frame of ``pipe``'s VAE decodes to (4 for every supported family), 1 if none."""
    for name in ("vae_scale_factor_temporal", "vae_temporal_compression_ratio"):  # LTX-Video: the second
        value = getattr(pipe, name, None)
        if value:
            return int(value)
    return 1


def check_frames(pipe, frames: int, model: str, causal_block_size: int | None = None) -> None:
    """Raise ``ValueError`` unless ``pipe`` makes exactly ``frames`` frames: ``t*k + 1`` with ``t`` from
    :func:`frames_per_latent`. The pipelines round other counts silently (Wan: 0 frames gives 1).
    Diffusion forcing with ``causal_block_size`` also needs whole blocks of latent frames."""
    t = frames_per_latent(pipe)
    if frames < 1 or (frames - 1) % t:
        if t == 1:
            raise ValueError(f"{model} needs frames >= 1, got {frames}")
        low = max(1, (frames - 1) // t * t + 1)
        raise ValueError(f"{model} needs frames = {t}k+1 (e.g. {low} or {low + t}), got {frames}")
    block = causal_block_size or 1
    if ((frames - 1) // t + 1) % block:
        examples = ", ".join(str((m * block - 1) * t + 1) for m in (1, 2, 3))
        raise ValueError(f"{model} denoises {block} latent frames per causal block: frames must give a multiple of "
                         f"{block} latent frames (e.g. {examples}), got {frames}")


def _accepts(pipe, name):
    return name in inspect.signature(pipe.__call__).parameters


def generate_video(pipe, processor=None, *, device=None, **call_kwargs) -> GenerationResult:
    """Generate one video with ``processor`` (None: dense through ``DenseProcessor``) and time it."""
    processor = processor if processor is not None else DenseProcessor()
    enable_diffusers(pipe, processor)
    try:
        with attention_timer() as box:
            timer = StepTimer(box, device)
            kwargs = dict(call_kwargs)
            if _accepts(pipe, "callback_on_step_end"):
                kwargs["callback_on_step_end"] = timer
            kwargs.setdefault("output_type", "np")
            step_state.new_generation()
            start = time.perf_counter()
            timer.start()
            output = pipe(**kwargs)
            timer._sync()
            total = time.perf_counter() - start
    finally:
        disable_diffusers(pipe)
    frames = output.frames[0]
    frames = frames.float().cpu().numpy() if torch.is_tensor(frames) else np.asarray(frames, dtype=np.float32)
    if frames.ndim == 4 and frames.shape[1] == 3 and frames.shape[-1] != 3:  # (T, C, H, W) -> (T, H, W, C)
        frames = frames.transpose(0, 2, 3, 1)
    return GenerationResult(frames, timer.step_seconds, timer.attention_seconds, total, processor.describe())
