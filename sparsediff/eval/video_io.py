"""Uniform frame sampling and decoding for video benchmarks: decord (the ``decord2`` package) when it
can read the file, imageio's ffmpeg reader otherwise (with a warning), optional max-pixels resize; and
:func:`write_video` for the videos the library writes."""

from __future__ import annotations

import dataclasses
import logging
import math
import warnings
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class Frames:
    """Sampled frames ``(T, H, W, 3)`` uint8 and where they came from (models use the timing)."""

    array: np.ndarray
    indices: list[int]
    source_fps: float
    total_frames: int

    @property
    def sampled_fps(self) -> float:
        if self.total_frames <= 0 or not self.source_fps:
            return float(self.source_fps or 1.0)
        return len(self.indices) / self.total_frames * self.source_fps

    def metadata(self) -> dict:
        """As transformers' ``VideoMetadata`` fields, so processors compute timestamps correctly."""
        t, h, w, _ = self.array.shape
        return {"total_num_frames": self.total_frames, "fps": self.source_fps, "frames_indices": list(self.indices),
                "height": h, "width": w, "duration": self.total_frames / self.source_fps if self.source_fps else None}


def sample_indices(total_frames: int, source_fps: float, *, num_frames: int | None = None,
                   fps: float | None = None, max_frames: int | None = None) -> list[int]:
    """Frame indices spread uniformly over the whole video: ``num_frames`` of them, or ``fps`` per
    second of video; either way at most ``max_frames`` and at least 1."""
    if total_frames <= 0:
        raise ValueError("the video has no frames")
    if num_frames is not None and fps is not None:
        raise ValueError("give num_frames or fps, not both")
    if fps is not None:
        duration = total_frames / (source_fps or 1.0)
        count = max(1, int(round(duration * fps)))
    else:
        count = num_frames if num_frames is not None else total_frames
    if max_frames is not None:
        count = min(count, max_frames)
    count = max(1, min(count, total_frames))
    # Centres of equal segments: the first and last frames are not over-represented.
    edges = np.linspace(0, total_frames, count + 1)
    return [int(i) for i in np.minimum(((edges[:-1] + edges[1:]) / 2).astype(int), total_frames - 1)]


def resize_to_max_pixels(array: np.ndarray, max_pixels: int | None) -> np.ndarray:
    """Downscale ``(T, H, W, 3)`` frames so that H*W <= max_pixels, keeping the aspect ratio."""
    t, h, w, _ = array.shape
    if not max_pixels or h * w <= max_pixels:
        return array
    import torch

    scale = math.sqrt(max_pixels / (h * w))
    nh, nw = max(1, int(h * scale)), max(1, int(w * scale))
    x = torch.from_numpy(array).permute(0, 3, 1, 2).float()
    x = torch.nn.functional.interpolate(x, size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)
    return x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


def _read_decord(path, *, num_frames, fps, max_frames):
    import decord  # the decord2 wheel installs the module "decord"

    reader = decord.VideoReader(str(path), num_threads=1)
    total, source_fps = len(reader), float(reader.get_avg_fps())
    indices = sample_indices(total, source_fps, num_frames=num_frames, fps=fps, max_frames=max_frames)
    return Frames(reader.get_batch(indices).asnumpy(), indices, source_fps, total)


def _read_imageio(path, *, num_frames, fps, max_frames):
    import imageio

    with imageio.get_reader(str(path), "ffmpeg") as reader:
        source_fps = float(reader.get_meta_data().get("fps") or 1.0)
        total = reader.count_frames()
        indices = sample_indices(total, source_fps, num_frames=num_frames, fps=fps, max_frames=max_frames)
        wanted, frames = set(indices), {}
        # Sequential decoding: seeking in the ffmpeg reader restarts ffmpeg, far slower than one pass.
        for i, frame in enumerate(reader):
            if i in wanted:
                frames[i] = np.asarray(frame)[..., :3]
            if i >= indices[-1]:
                break
    # count_frames can overshoot by a frame or two on some containers: repeat the last decoded one.
    last = frames[max(frames)] if frames else None
    if last is None:
        raise ValueError(f"{path}: could not decode any frame")
    return Frames(np.stack([frames.get(i, last) for i in indices]), indices, source_fps, total)


def read_video(path, *, num_frames: int | None = None, fps: float | None = None, max_frames: int | None = None,
               max_pixels: int | None = None, backend: str = "auto") -> Frames:
    """Uniformly sampled RGB frames of the video at ``path``. ``backend``: "auto" (decord, falling back
    to imageio with a warning), "decord" or "imageio"."""
    if backend not in ("auto", "decord", "imageio"):
        raise ValueError(f"unknown video backend {backend!r}; use auto, decord or imageio")
    frames = None
    if backend in ("auto", "decord"):
        try:
            frames = _read_decord(path, num_frames=num_frames, fps=fps, max_frames=max_frames)
        except Exception as err:  # ImportError, or a file decord cannot handle
            if backend == "decord":
                raise ValueError(f"{path}: decord could not read the video: {err}") from err
            warnings.warn(f"decord could not read {path} ({type(err).__name__}: {str(err)[:120]}); "
                          "falling back to imageio (slower)", RuntimeWarning, stacklevel=2)
    if frames is None:
        try:
            frames = _read_imageio(path, num_frames=num_frames, fps=fps, max_frames=max_frames)
        except Exception as err:
            raise ValueError(f"{path}: could not read the video: {err}") from err
    frames.array = resize_to_max_pixels(frames.array, max_pixels)
    return frames


# Containers that only imageio's FFMPEG plugin (the imageio-ffmpeg package) writes.
FFMPEG_SUFFIXES = (".mp4", ".m4v", ".mov", ".mkv", ".avi", ".webm")
_warned_no_ffmpeg = False


def ffmpeg_available() -> bool:
    """Whether imageio's FFMPEG plugin can write: imageio-ffmpeg installed and its ffmpeg binary found."""
    try:
        import imageio_ffmpeg

        imageio_ffmpeg.get_ffmpeg_exe()
    except (ImportError, RuntimeError):
        return False
    return True


def write_video(path, frames, fps: int = 16, **ffmpeg_options) -> Path:
    """Write ``(T, H, W, 3)`` uint8 frames to ``path`` (``.mp4`` and other containers in ``FFMPEG_SUFFIXES``, or
    ``.gif``) and return the path written. Containers go through the FFMPEG plugin by name: left to choose,
    imageio hands ``.mp4`` to another plugin (TIFF) that fails on ``fps``. Without imageio-ffmpeg the frames go
    to a ``.gif`` of the same name instead, with a warning (once per process)."""
    global _warned_no_ffmpeg
    import imageio

    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (*FFMPEG_SUFFIXES, ".gif"):
        raise ValueError(f"{path}: cannot write a video with suffix {path.suffix!r}; use .mp4 "
                         f"({', '.join(FFMPEG_SUFFIXES[1:])}) or .gif")
    path.parent.mkdir(parents=True, exist_ok=True)
    frames = np.asarray(frames)
    if suffix in FFMPEG_SUFFIXES:
        if ffmpeg_available():
            imageio.mimwrite(str(path), frames, format="FFMPEG", fps=fps, **ffmpeg_options)
            return path
        if not _warned_no_ffmpeg:
            logger.warning("imageio's FFMPEG plugin is not installed (pip install imageio[ffmpeg]): videos are "
                           "written as .gif instead of %s, e.g. %s", suffix, path.with_suffix(".gif"))
            _warned_no_ffmpeg = True
        path = path.with_suffix(".gif")
    import imageio.v3 as iio

    # Pillow's GIF: duration per frame in milliseconds, loop forever.
    iio.imwrite(path, frames, plugin="pillow", extension=".gif", duration=1000 / fps, loop=0)
    return path
