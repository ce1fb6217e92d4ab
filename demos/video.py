"""Video tab: one prompt generated dense and sparse with the same seed, timed per step, compared by
PSNR/SSIM, plus a heatmap of the block mask BA-Att keeps on one captured layer and head.

Generation, timing and metrics are the library's (``pipelines.generate.generate_video``,
``eval.video_metrics.compare_videos``); this module validates inputs, caches pipelines and formats.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import os
import threading
import uuid

import numpy as np
import torch

from sparsediff.attention_processors import CaptureConfig, DenseProcessor, SparseAttnProcessor, transformers_of
from sparsediff.commands.generate import TINY_METHOD_DEFAULTS, _call_kwargs, load_pipeline, write_video
from sparsediff.eval.video_metrics import compare_videos
from sparsediff.pipelines.generate import check_frames, generate_video
from sparsediff.testing.tiny import DF_CAUSAL_BLOCK

from .common import (
    DemoInputError,
    cancel_hooks,
    check_prompt,
    check_sparsity,
    default_device,
    no_progress,
    output_dir,
    positive_int,
    resolve_method,
    seconds,
)

TINY_MODELS = ("tiny-wan", "tiny-skyreels-df")
METHODS = {"Dense": "dense", "BA-Att": "ba_att", "SparseD": "sparsed", "FlashBlock": "flashblock"}
FPS = 8

_PIPELINES: dict = {}
_PIPELINE_LOCK = threading.Lock()


@dataclasses.dataclass
class VideoRequest:
    model: str = "tiny-wan"
    prompt: str = "a red cat walks on the beach at sunset"
    frames: int = 17
    height: int = 128
    width: int = 128
    steps: int = 4
    method: str = "BA-Att"  # a label of METHODS or a method name
    sparsity: float = 0.5
    beta: float = 0.5
    norm_sort: bool = True
    seed: int = 0
    layer: int = 1  # self-attention layer shown in the heatmap
    head: int = 0

    def method_name(self) -> str:
        return resolve_method(self.method, METHODS)


@dataclasses.dataclass
class VideoResult:
    dense_video: str
    sparse_video: str
    heatmap: str | None
    timing_markdown: str
    metrics_markdown: str
    step_rows: list  # [step, dense s, sparse s, speed-up]
    report: dict


def is_tiny(model: str) -> bool:
    return model in TINY_MODELS


def check_request(req: VideoRequest, device: str) -> None:
    """Cheap checks before anything loads; model-dependent ones follow in :func:`check_geometry`."""
    check_prompt(req.prompt)
    req.method_name()
    req.sparsity = check_sparsity(req.sparsity)
    if not isinstance(req.beta, (int, float)) or req.beta < 0:
        raise DemoInputError(f"beta must be a number >= 0, got {req.beta!r}")
    for name in ("frames", "height", "width", "steps"):
        setattr(req, name, positive_int(getattr(req, name), name))
    req.layer, req.head = positive_int(req.layer, "layer", minimum=0), positive_int(req.head, "head", minimum=0)
    model = (req.model or "").strip()
    if not model:
        raise DemoInputError("choose a model")
    if is_tiny(model):
        return
    looks_like_model = os.path.isdir(model) or (model.count("/") == 1 and " " not in model)
    if not looks_like_model:
        raise DemoInputError(f"unknown model {model!r}: use {' or '.join(TINY_MODELS)}, a diffusers hub id "
                             "(org/name) or a local pipeline folder")
    if torch.device(device).type != "cuda":
        raise DemoInputError(f"{model!r} is a full-size model and needs a GPU; on this CPU machine use "
                             f"{' or '.join(TINY_MODELS)}")


def get_pipeline(model: str, device: str):
    """Load once per (model, device); generation runs one at a time (queue concurrency 1)."""
    key = (model, device)
    with _PIPELINE_LOCK:
        if key not in _PIPELINES:
            _PIPELINES[key] = _load(model, device)
        return _PIPELINES[key]


def _load(model: str, device: str):
    if is_tiny(model):  # tiny-skyreels-df: diffusion forcing, block-causal attention, where FlashBlock applies
        pipe = load_pipeline(model, torch.float32, device)
    else:
        dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
        try:
            pipe = load_pipeline(model, dtype, device)
        except Exception as err:  # noqa: BLE001 -- any loading failure becomes a message
            raise DemoInputError(f"could not load {model!r}: {type(err).__name__}: {err}") from err
    pipe.set_progress_bar_config(leave=False)
    return pipe


def block_causal(pipe) -> bool:
    return "DiffusionForcing" in type(pipe).__name__


def check_geometry(req: VideoRequest, pipe) -> None:
    """Frame count and size rules of the loaded model, and FlashBlock's need for block-causal attention."""
    spatial = int(getattr(pipe, "vae_scale_factor_spatial", 8) or 8)
    patch = getattr(transformers_of(pipe)[0].config, "patch_size", (1, 2, 2))
    patch = patch[-1] if isinstance(patch, (tuple, list)) else int(patch)
    try:
        check_frames(pipe, req.frames, req.model, DF_CAUSAL_BLOCK if block_causal(pipe) else None)
    except ValueError as err:
        raise DemoInputError(str(err)) from None
    multiple = spatial * patch
    for name in ("height", "width"):
        if getattr(req, name) % multiple:
            raise DemoInputError(f"{name} must be a multiple of {multiple} for {req.model}, got {getattr(req, name)}")
    if req.method_name() == "flashblock" and not block_causal(pipe):
        raise DemoInputError("FlashBlock caches attention to earlier frame blocks, so it needs a block-causal "
                             "model: choose tiny-skyreels-df (or a SkyReels-V2 diffusion-forcing model)")


def method_overrides(req: VideoRequest, tiny: bool) -> dict:
    name = req.method_name()
    overrides = dict(TINY_METHOD_DEFAULTS) if tiny else {}
    if name == "ba_att":
        overrides.update(sparsity=req.sparsity, beta=float(req.beta), norm_sort=bool(req.norm_sort))
    elif name == "sparsed":
        overrides.update(sparsity=req.sparsity)
    elif name == "flashblock" and req.sparsity > 0:
        # A budget turns on FlashBlock's combined mode: sparse external attention plus a cached residual.
        overrides.update(sparse_selector="ba_att", sparsity=req.sparsity)
    return overrides


def self_attention_layers(pipe) -> list[str]:
    names = [k[: -len(".processor")] for k in transformers_of(pipe)[0].attn_processors]
    own = [n for n in names if n.endswith("attn1")]
    return own or names


def _call(pipe, req: VideoRequest, device: str) -> dict:
    args = argparse.Namespace(prompt=req.prompt, negative_prompt=None, guidance_scale=None, frames=req.frames,
                              height=req.height, width=req.width, steps=req.steps, seed=int(req.seed))
    kwargs = _call_kwargs(pipe, args, is_tiny(req.model), device)
    if block_causal(pipe):
        kwargs.setdefault("prompt", None)  # prompt_embeds are passed, but the argument is required
        kwargs["causal_block_size"] = DF_CAUSAL_BLOCK
    return kwargs


def run_video(req: VideoRequest, *, progress=no_progress, cancel=None, device: str | None = None) -> VideoResult:
    """Dense and sparse runs of one request; raises :class:`DemoInputError` for bad inputs."""
    device = device or default_device()
    req.model = (req.model or "").strip()
    check_request(req, device)
    progress(0.02, desc=f"loading {req.model}")
    pipe = get_pipeline(req.model, device)
    check_geometry(req, pipe)
    tiny = is_tiny(req.model)
    try:
        processor = SparseAttnProcessor(req.method_name(), **method_overrides(req, tiny))
    except (TypeError, ValueError) as err:
        raise DemoInputError(str(err)) from err

    layers = self_attention_layers(pipe)
    layer = layers[min(req.layer, len(layers) - 1)]
    run_id = uuid.uuid4().hex[:10]
    capture_dir = os.path.join(output_dir(), f"qk-{run_id}")
    # Q/K of the heatmap's layer come from the dense run's last step (the true attention of that layer).
    capture = CaptureConfig(capture_dir, layers=(layer, f"{layer}/*"), steps=(req.steps - 1,))

    modules = transformers_of(pipe)
    with cancel_hooks(modules, cancel):
        progress(0.05, desc="dense run")
        dense = generate_video(pipe, DenseProcessor(capture=capture), device=device, **_call(pipe, req, device))
        progress(0.5, desc=f"{req.method} run")
        sparse = generate_video(pipe, processor, device=device, **_call(pipe, req, device))
    progress(0.92, desc="metrics and heatmap")
    base = os.path.join(output_dir(), f"video-{run_id}")
    dense_path, sparse_path = f"{base}.dense.mp4", f"{base}.{req.method_name()}.mp4"
    dense_path = write_video(dense_path, dense.frames, FPS)  # a .gif without imageio-ffmpeg
    sparse_path = write_video(sparse_path, sparse.frames, FPS)
    metrics = compare_videos(dense.frames, sparse.frames, layout="thwc")
    heatmap = None
    try:
        heatmap = mask_heatmap(capture_dir, req, f"{base}.mask.png", layer=layer)
    except (FileNotFoundError, IndexError) as err:
        metrics["heatmap_note"] = str(err)
    progress(1.0, desc="done")
    return _result(req, dense, sparse, metrics, dense_path, sparse_path, heatmap, processor, layer)


def _result(req, dense, sparse, metrics, dense_path, sparse_path, heatmap, processor, layer) -> VideoResult:
    dense_s, sparse_s = sum(dense.step_seconds), sum(sparse.step_seconds)
    speedup = dense_s / max(sparse_s, 1e-12)
    rows = [[i, round(d, 4), round(s, 4), round(d / max(s, 1e-12), 2)]
            for i, (d, s) in enumerate(zip(dense.step_seconds, sparse.step_seconds))]
    from sparsediff.commands.generate import describe_routes
    from sparsediff.eval.records import strict_json

    described = processor.describe()
    step_speedup = dense.median_step_seconds / max(sparse.median_step_seconds, 1e-12)
    timing = (f"**Dense**: {seconds(dense_s)} denoising ({seconds(dense.total_seconds)} total), attention "
              f"{100 * dense.attention_share:.0f}%  \n"
              f"**{req.method}**: {seconds(sparse_s)} denoising ({seconds(sparse.total_seconds)} total), attention "
              f"{100 * sparse.attention_share:.0f}%; {describe_routes(described)}  \n"
              f"**Speed-up per step** (median): {step_speedup:.2f}x; over the whole denoising {speedup:.2f}x "
              "(it includes the first steps' one-off kernel compilation)")
    if not described.get("routes", {}).get("sparse"):
        timing += f"  \n**No attention call ran {req.method}**: both runs are dense, the speed-up is noise."
    psnr = "identical (inf dB)" if np.isinf(metrics["psnr"]) else f"{metrics['psnr']:.2f} dB"
    quality = f"**PSNR** {psnr} · **SSIM** {metrics['ssim']:.4f} (sparse vs dense, same seed)"
    if heatmap is not None:
        quality += f"  \nHeatmap: `{layer}`, head {req.head}, BA-Att selection at sparsity {req.sparsity:g}"
    report = {"request": dataclasses.asdict(req), "dense": dense.summary(), "sparse": sparse.summary(),
              "speedup": speedup, "speedup_median_step": step_speedup, "fidelity": metrics, "processor": described}
    report = strict_json(report)  # JSON has no Infinity (PSNR of identical frames)
    return VideoResult(dense_path, sparse_path, heatmap, timing, quality, rows, report)


# -- block-mask heatmap ---------------------------------------------------------------------------------

def kept_masks(q, k, v, *, sparsity, beta, block_size, frame_size=None, global_tokens=0):
    """BA-Att's kept blocks ``(B, H, nqb, nkb)`` on keys as given and after norm sorting, and the share of
    the true attention mass each keeps (per head). The paper's selection (pooled estimate with ``beta``, the
    same count per query block), whose block statistics norm sorting is meant to sharpen."""
    from sparsediff.kernels import index_to_mask
    from sparsediff.methods.ba_att import BAAttConfig, select_blocks, sort_keys

    cfg = BAAttConfig.paper(sparsity=sparsity, beta=beta, block_size=block_size, min_seq_len=0)
    sorted_k, _, _ = sort_keys(k, v, segment=frame_size, start=min(global_tokens, k.shape[2]))
    out = {}
    for name, keys in (("unsorted", k), ("sorted", sorted_k)):
        index, count = select_blocks(q, keys, cfg, global_tokens=global_tokens)
        nkb = -(-keys.shape[2] // block_size)
        mask = index_to_mask(index, count, nkb)
        out[name] = (mask, _kept_mass(q, keys, mask, block_size))
    return out


def _kept_mass(q, k, mask, block_size):
    """Share of the softmax mass inside kept blocks, mean over queries, per (batch, head)."""
    hq, hkv = q.shape[1], k.shape[1]
    k = k.repeat_interleave(hq // hkv, dim=1).float()
    probs = torch.softmax(q.float() @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
    rows = mask.repeat_interleave(block_size, dim=-2)[..., : q.shape[2], :]
    keep = rows.repeat_interleave(block_size, dim=-1)[..., : k.shape[2]]
    return (probs * keep).sum(-1).mean(-1)


def _load_capture(capture_dir: str):
    from safetensors import safe_open

    files = glob.glob(os.path.join(capture_dir, "*.safetensors"))
    if not files:
        raise FileNotFoundError("no Q/K was captured for the heatmap (the layer ran outside the sparse route)")
    # Block-causal models give one file per frame block: the last block sees the longest prefix.
    def size(path):
        with safe_open(path, "pt") as f:
            return f.get_slice("k").get_shape()[2]

    path = max(files, key=size)
    with safe_open(path, "pt") as f:
        meta = f.metadata()
        q, k, v = (f.get_tensor(n) for n in ("q", "k", "v"))
    return q, k, v, meta


def mask_heatmap(capture_dir: str, req: VideoRequest, path: str, *, layer: str, block_size: int | None = None) -> str:
    """PNG with BA-Att's kept blocks for ``req.head`` before and after norm sorting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    q, k, v, meta = _load_capture(capture_dir)
    head = min(req.head, q.shape[1] - 1)
    frame = int(meta["frame_size"]) if meta.get("frame_size", "None") != "None" else None
    block_size = block_size or (TINY_METHOD_DEFAULTS["block_size"] if is_tiny(req.model) else 128)
    masks = kept_masks(q, k, v, sparsity=req.sparsity, beta=float(req.beta), block_size=block_size,
                       frame_size=frame, global_tokens=int(meta.get("global_tokens", 0)))
    fig, axes = plt.subplots(1, 2, figsize=(8, 4), constrained_layout=True)
    for ax, (name, title) in zip(axes, (("unsorted", "keys as computed"), ("sorted", "after norm sorting"))):
        mask, mass = masks[name]
        ax.imshow(mask[0, head].numpy(), cmap="Blues", vmin=0, vmax=1, interpolation="nearest", aspect="auto")
        ax.set_title(f"{title}\nkept {mask[0, head].float().mean():.0%} of blocks, "
                     f"{mass[0, head]:.1%} of attention mass", fontsize=9)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("key block")
        ax.set_ylabel("query block")
    fig.suptitle(f"{meta.get('layer', layer)}, head {head}, step {meta.get('step')}", fontsize=10)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path

