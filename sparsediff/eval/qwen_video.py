"""Qwen2-VL / Qwen2.5-VL video inputs without torchvision.

transformers' video processors need torchvision, which not every torch build can install beside it. This
module rebuilds what ``Qwen2VLVideoProcessor`` plus ``Qwen2_5_VLProcessor.__call__`` produce, with torch
only, from frames that are already sampled:

- resize each frame to ``smart_resize`` (multiples of ``patch_size * merge_size``, pixels within
  min/max) with bicubic + antialias, rounded back to uint8 (what torchvision's tensor resize does);
- rescale and normalize with the processor's mean/std;
- pad the frame count to a multiple of ``temporal_patch_size`` by repeating the last frame;
- patchify to ``(grid_t * grid_h * grid_w, C * temporal_patch_size * patch_size**2)``, patches ordered
  by time, merge block row, merge block column, then row and column inside the block;
- expand each ``<|video_pad|>`` (and ``<|image_pad|>``) to one token per merged patch, tokenize, and add
  ``mm_token_type_ids`` / ``second_per_grid_ts`` when the processor's model takes them.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re

import numpy as np

logger = logging.getLogger(__name__)

_warned = False


def warn_once() -> None:
    global _warned
    if not _warned:
        logger.warning("video processor unavailable (it needs torchvision): building Qwen2-VL video inputs with "
                       "sparsediff.eval.qwen_video (torch only)")
        _warned = True


def smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = 56 * 56,
                 max_pixels: int = 14 * 14 * 4 * 1280) -> tuple[int, int]:
    """Qwen2-VL's target size: both sides multiples of ``factor``, area in [min_pixels, max_pixels],
    aspect ratio kept as closely as possible."""
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"aspect ratio must be below 200, got {height}x{width}")
    h_bar, w_bar = round(height / factor) * factor, round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar, w_bar = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def _get(obj, name, default=None):
    value = obj.get(name) if isinstance(obj, dict) else getattr(obj, name, None)
    return default if value is None else value


@dataclasses.dataclass
class VideoSettings:
    patch_size: int = 14
    merge_size: int = 2
    temporal_patch_size: int = 2
    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280
    image_mean: tuple = (0.48145466, 0.4578275, 0.40821073)
    image_std: tuple = (0.26862954, 0.26130258, 0.27577711)
    rescale_factor: float = 1 / 255
    do_resize: bool = True
    do_rescale: bool = True
    do_normalize: bool = True

    @classmethod
    def from_processor(cls, image_processor, overrides: dict | None = None) -> VideoSettings:
        """Settings of a Qwen2-VL image processor (an object or its config dict); ``overrides`` (e.g. a
        ``video_preprocessor_config.json``) win. ``size`` {shortest_edge, longest_edge} is min/max pixels."""
        values = {}
        for source in (image_processor, overrides or {}):
            size = _get(source, "size") or {}
            for key, size_key in (("min_pixels", "shortest_edge"), ("max_pixels", "longest_edge")):
                value = _get(size, size_key, _get(source, key))
                if value is not None:
                    values[key] = int(value)
            for field in dataclasses.fields(cls):
                if field.name not in ("min_pixels", "max_pixels") and _get(source, field.name) is not None:
                    values[field.name] = _get(source, field.name)
        values["image_mean"] = tuple(np.broadcast_to(values.get("image_mean", cls.image_mean), 3).tolist())
        values["image_std"] = tuple(np.broadcast_to(values.get("image_std", cls.image_std), 3).tolist())
        return cls(**values)


def _resize_uint8(video, height: int, width: int):
    """Bicubic + antialias on uint8 frames as torchvision's tensor resize does it: the native uint8 kernel
    on CPU, float then clamp and round elsewhere (the two can differ by a few levels)."""
    import torch

    if video.device.type == "cpu" and video.dtype == torch.uint8:
        return torch.nn.functional.interpolate(video.contiguous(), size=(height, width), mode="bicubic",
                                               antialias=True, align_corners=False)
    x = torch.nn.functional.interpolate(video.float(), size=(height, width), mode="bicubic", antialias=True,
                                        align_corners=False)
    return x.clamp_(0, 255).round_().to(torch.uint8)


def preprocess_video(frames, settings: VideoSettings):
    """``frames`` (T, H, W, C) uint8 -> (pixel_values_videos (grid_t*grid_h*grid_w, C*tps*p*p) float32,
    (grid_t, grid_h, grid_w))."""
    import torch

    # Host-side like the processor it mirrors: CPU tensors (and its uint8 resize) whatever the default device.
    video = torch.as_tensor(np.asarray(frames), device="cpu")
    if video.ndim != 4 or video.shape[-1] not in (1, 3):
        raise ValueError(f"expected frames shaped (T, H, W, C), got {tuple(video.shape)}")
    video = video.permute(0, 3, 1, 2)  # (T, C, H, W)
    p, m, tps = settings.patch_size, settings.merge_size, settings.temporal_patch_size
    height, width = video.shape[-2:]
    if settings.do_resize:
        height, width = smart_resize(height, width, p * m, settings.min_pixels, settings.max_pixels)
        if (height, width) != tuple(video.shape[-2:]):
            video = _resize_uint8(video, height, width)
    elif height % (p * m) or width % (p * m):
        raise ValueError(f"frames of {height}x{width} are not multiples of {p * m} and resizing is off")
    x = video.float()
    if settings.do_rescale:
        x = x * settings.rescale_factor
    if settings.do_normalize:
        mean = torch.tensor(settings.image_mean, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(settings.image_std, device=x.device).view(1, -1, 1, 1)
        x = (x - mean) / std
    if pad := -x.shape[0] % tps:
        x = torch.cat([x, x[-1:].expand(pad, -1, -1, -1)])  # repeat the last frame, as the processor does
    t, c = x.shape[:2]
    gt, gh, gw = t // tps, height // p, width // p
    x = x.reshape(gt, tps, c, gh // m, m, p, gw // m, m, p)
    # -> (gt, gh/m, gw/m, m_row, m_col, C, tps, p_row, p_col): merge blocks stay contiguous for the merger.
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return x.reshape(gt * gh * gw, c * tps * p * p).contiguous(), (gt, gh, gw)


def expand_placeholders(texts, tokens_per_item: dict[str, list[int]]) -> list[str]:
    """Replace the k-th occurrence (over the batch, in order) of each placeholder token with
    ``tokens_per_item[token][k]`` copies of it, as ``ProcessorMixin.__call__`` does."""
    tokens = [t for t, counts in tokens_per_item.items() if counts]
    if not tokens:
        return list(texts)
    pattern = re.compile("|".join(re.escape(t) for t in tokens))
    counters = {t: iter(tokens_per_item[t]) for t in tokens}

    def repl(match):
        try:
            return match.group() * next(counters[match.group()])
        except StopIteration:
            raise ValueError(f"more {match.group()} placeholders in the prompts than inputs for them") from None

    out = [pattern.sub(repl, text) for text in texts]
    for token, rest in counters.items():
        if next(rest, None) is not None:
            raise ValueError(f"fewer {token} placeholders in the prompts than inputs for them")
    return out


def build_inputs(processor, texts, images=None, videos=None, video_settings: VideoSettings | None = None):
    """What ``processor(text=texts, images=images, videos=..., padding=True, return_tensors="pt")`` gives
    for a Qwen2-VL / Qwen2.5-VL processor, without its video processor. ``videos`` are objects with
    ``array`` (T, H, W, C) uint8 and ``sampled_fps`` (``video_io.Frames``), frames already sampled."""
    import torch
    from transformers import BatchFeature

    tok = processor.tokenizer
    image_token = getattr(processor, "image_token", "<|image_pad|>")
    video_token = getattr(processor, "video_token", "<|video_pad|>")
    settings = video_settings or VideoSettings.from_processor(processor.image_processor)
    merge = settings.merge_size**2
    data, counts = {}, {image_token: [], video_token: []}
    if images:
        image_inputs = processor.image_processor(images, return_tensors="pt")
        data.update(pixel_values=image_inputs["pixel_values"], image_grid_thw=image_inputs["image_grid_thw"])
        image_merge = getattr(processor.image_processor, "merge_size", settings.merge_size) ** 2
        counts[image_token] = [int(g.prod()) // image_merge for g in image_inputs["image_grid_thw"]]
    if videos:
        patches, grids = zip(*(preprocess_video(v.array, settings) for v in videos))
        data["pixel_values_videos"] = torch.cat(patches)
        data["video_grid_thw"] = torch.tensor(grids, dtype=torch.long)
        counts[video_token] = [math.prod(g) // merge for g in grids]
    text_inputs = tok(expand_placeholders(texts, counts), padding=True, return_tensors="pt")
    names = set(getattr(processor, "model_input_names", ()))
    if "mm_token_type_ids" in names:  # Qwen2-VL's 3D positions (mrope) are computed from these
        ids = text_inputs["input_ids"]
        kinds = torch.zeros_like(ids)
        kinds[ids == tok.convert_tokens_to_ids(image_token)] = 1
        kinds[ids == tok.convert_tokens_to_ids(video_token)] = 2
        text_inputs["mm_token_type_ids"] = kinds
    if videos and "second_per_grid_ts" in names:  # Qwen2.5-VL: seconds of video per temporal patch
        data["second_per_grid_ts"] = torch.tensor([settings.temporal_patch_size / v.sampled_fps for v in videos])
    return BatchFeature({**text_inputs, **data})


def image_only_processor_class(base):
    """``base`` (e.g. ``Qwen2_5_VLProcessor``) accepting ``video_processor=None``: transformers refuses a
    missing sub-processor, but images and text need none, and videos go through ``build_inputs``."""

    class ImageOnlyProcessor(base):
        def check_argument_for_proper_class(self, argument_name, argument):
            if argument is None and argument_name == "video_processor":
                return None
            return super().check_argument_for_proper_class(argument_name, argument)

    ImageOnlyProcessor.__name__ = ImageOnlyProcessor.__qualname__ = f"ImageOnly{base.__name__}"
    return ImageOnlyProcessor


PROCESSORS = {"qwen2_vl": "Qwen2VLProcessor", "qwen2_5_vl": "Qwen2_5_VLProcessor"}


def load_processor_without_video(model_id):
    """The processor of a Qwen2-VL / Qwen2.5-VL checkpoint with no video processor (tokenizer, image
    processor, chat template), plus the video settings (``video_preprocessor_config.json`` if present)."""
    import json

    import transformers
    from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer
    from transformers.utils import cached_file

    model_type = AutoConfig.from_pretrained(model_id).model_type
    if model_type not in PROCESSORS:
        raise RuntimeError(f"{model_id}: its video processor needs torchvision, and the torch-only video path "
                           f"covers only {', '.join(PROCESSORS)} (got {model_type}); install torchvision")

    def optional(name):
        return cached_file(model_id, name, _raise_exceptions_for_missing_entries=False,
                           _raise_exceptions_for_connection_errors=False)

    tokenizer = AutoTokenizer.from_pretrained(model_id)
    chat_template = getattr(tokenizer, "chat_template", None)
    if path := optional("chat_template.jinja"):
        chat_template = open(path, encoding="utf-8").read()
    elif path := optional("chat_template.json"):
        chat_template = json.load(open(path, encoding="utf-8"))["chat_template"]
    image_processor = AutoImageProcessor.from_pretrained(model_id)
    cls = image_only_processor_class(getattr(transformers, PROCESSORS[model_type]))
    processor = cls(image_processor=image_processor, tokenizer=tokenizer, video_processor=None,
                    chat_template=chat_template)
    overrides = None
    if path := optional("video_preprocessor_config.json"):
        overrides = json.load(open(path, encoding="utf-8"))
    return processor, VideoSettings.from_processor(image_processor, overrides)
