"""``sparsediff generate``: one video from a diffusers pipeline with sparse attention, plus a JSON report
(per-step time, attention share, method config; with ``--compare-dense`` also the dense run's timing
and PSNR/SSIM of the decoded frames against it).

    sparsediff generate --model tiny-wan --method ba_att --sparsity 0.5 --out out.mp4 --compare-dense
    sparsediff generate --model Wan-AI/Wan2.1-T2V-1.3B-Diffusers --method ba_att --sparsity 0.5 \\
        --frames 81 --height 480 --width 832 --steps 50 --dtype bfloat16 --out wan.mp4 --compare-dense
"""

from __future__ import annotations

import argparse
import inspect
import json
import logging
import math
import os
import platform
import sys

import numpy as np
import torch

from ..eval.records import strict_json
from .args import positive_int

logger = logging.getLogger(__name__)

REAL_DEFAULTS = {"frames": 81, "height": 480, "width": 832, "steps": 50}
TINY_STEPS = 4
TINY_METHOD_DEFAULTS = {"block_size": 16, "min_seq_len": 0}  # tiny latents have ~100-200 tokens


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..testing.tiny import PIPELINE_NAMES

    parser.add_argument("--model", default="tiny-wan",
                        help=f"hub id, local pipeline folder, or {' / '.join(PIPELINE_NAMES)} (random weights, runs "
                             "on a CPU in seconds)")
    parser.add_argument("--method", default="ba_att", help="ba_att, sparsed, flashblock, block_sparse, dense, ...")
    parser.add_argument("--sparsity", type=float, default=None, help="share of key blocks skipped (budgeted methods)")
    parser.add_argument("--block-size", type=int, default=None)
    parser.add_argument("--min-seq-len", type=int, default=None, help="shorter attention stays dense")
    parser.add_argument("--dense-steps", type=int, default=None, help="first denoising steps run dense")
    parser.add_argument("--dense-step-fraction", type=float, default=None)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="any other method config field, e.g. --set beta=0.5 --set selector=xattention")
    parser.add_argument("--prompt", default="a red cat walks on the beach at sunset")
    parser.add_argument("--negative-prompt", default=None)
    parser.add_argument("--frames", type=positive_int, default=None,
                        help="default 81 (tiny models: 17, tiny-cogvideox and tiny-ltx: 9, tiny-skyreels-df: 13); "
                             "Wan-style VAEs make 4k+1 frames")
    parser.add_argument("--height", type=positive_int, default=None,
                        help="default 480 (tiny models: 128, tiny-cogvideox and tiny-ltx: 64)")
    parser.add_argument("--width", type=positive_int, default=None,
                        help="default 832 (tiny models: 128, tiny-cogvideox and tiny-ltx: 64)")
    parser.add_argument("--steps", type=positive_int, default=None, help="denoising steps; default 50 (tiny models: 4)")
    parser.add_argument("--guidance-scale", type=float, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                        help="default bfloat16 on GPU, float32 on CPU")
    parser.add_argument("--device", default=None, help="default cuda when available")
    parser.add_argument("--fps", type=int, default=16)
    parser.add_argument("--out", default="out.mp4",
                        help="video path (.mp4 or .gif; .mp4 needs imageio-ffmpeg, without it a .gif is written); "
                             "the report goes next to it (.json)")
    parser.add_argument("--compare-dense", action="store_true", help="also run dense; report speed-up, PSNR, SSIM")
    parser.add_argument("--warmup-steps", type=int, default=2,
                        help="with --compare-dense: an untimed generation of this many steps per method first "
                             "(kernel compilation, caches); 0 skips it")
    parser.add_argument("--capture-dir", default=None, help="save post-RoPE q/k/v for `sparsediff probe`")
    parser.add_argument("--capture-layers", nargs="*", default=None, help="glob patterns, e.g. 'blocks.1?.attn1'")
    parser.add_argument("--capture-steps", nargs="*", type=int, default=None)


def _parse_value(text: str):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"true": True, "false": False, "none": None}.get(text.lower(), text)


def method_overrides(args, tiny: bool) -> dict:
    overrides = dict(TINY_METHOD_DEFAULTS) if tiny and args.method != "dense" else {}
    for flag in ("sparsity", "block_size", "min_seq_len", "dense_steps", "dense_step_fraction"):
        if getattr(args, flag) is not None:
            overrides[flag] = getattr(args, flag)
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set expects KEY=VALUE, got {item!r}")
        overrides[key.replace("-", "_")] = _parse_value(value)
    return overrides


def load_pipeline(model: str, dtype, device):
    from ..testing.tiny import PIPELINE_NAMES, tiny_pipeline

    if model in PIPELINE_NAMES:
        pipe = tiny_pipeline(model)
    else:
        from diffusers import DiffusionPipeline

        pipe = DiffusionPipeline.from_pretrained(model, torch_dtype=dtype)
    if model in PIPELINE_NAMES and dtype != torch.float32:
        pipe = pipe.to(dtype=dtype)
    return pipe.to(device)


def _call_kwargs(pipe, args, tiny: bool, device) -> dict:
    params = inspect.signature(pipe.__call__).parameters
    kwargs = dict(prompt=args.prompt, num_frames=args.frames, height=args.height, width=args.width,
                  num_inference_steps=args.steps, generator=torch.Generator("cpu").manual_seed(args.seed))
    if args.negative_prompt is not None:
        kwargs["negative_prompt"] = args.negative_prompt
    if args.guidance_scale is not None:
        kwargs["guidance_scale"] = args.guidance_scale
    if tiny and "max_sequence_length" in params:
        kwargs["max_sequence_length"] = 8 if "CogVideoX" in type(pipe).__name__ else 16
    if tiny and "causal_block_size" in params:
        from ..testing.tiny import DF_CAUSAL_BLOCK

        kwargs["causal_block_size"] = DF_CAUSAL_BLOCK
    if _needs_own_text_encoding(pipe):
        kwargs.update(_encode_t5(pipe, args, kwargs.pop("prompt"), kwargs.pop("negative_prompt", ""), device,
                                 kwargs.get("max_sequence_length", 512)))
        kwargs["prompt"] = None  # diffusion forcing requires the argument even with prompt_embeds
    return {k: v for k, v in kwargs.items() if k in params}


def _needs_own_text_encoding(pipe) -> bool:
    # SkyReels-V2's prompt cleaning calls ftfy unconditionally; without ftfy, encode the prompt here.
    module = sys.modules.get(type(pipe).__module__)
    return "SkyReels" in type(pipe).__name__ and module is not None and not hasattr(module, "ftfy")


def _encode_t5(pipe, args, prompt, negative, device, max_len) -> dict:
    def encode(text):
        tokens = pipe.tokenizer([text], padding="max_length", max_length=max_len, truncation=True,
                                add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
        ids, mask = tokens.input_ids.to(device), tokens.attention_mask.to(device)
        with torch.no_grad():
            embeds = pipe.text_encoder(ids, mask).last_hidden_state
        return embeds * mask[..., None].to(embeds.dtype)  # padded positions zero, as the pipeline does

    return {"prompt_embeds": encode(prompt), "negative_prompt_embeds": encode(negative or "")}


def write_video(path: str, frames: np.ndarray, fps: int) -> str:
    """Float frames in [0, 1] to ``path``; returns the path written (a .gif without imageio-ffmpeg)."""
    from ..eval.video_io import write_video as write

    data = (np.clip(frames, 0.0, 1.0) * 255).round().astype(np.uint8)
    return str(write(path, data, fps))


def _environment(device) -> dict:
    import diffusers

    env = {"python": platform.python_version(), "torch": torch.__version__, "diffusers": diffusers.__version__,
           "device": str(device)}
    if torch.device(device).type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


def _model_choices() -> str:
    from ..testing.tiny import PIPELINE_NAMES

    return (f"use a tiny model ({', '.join(PIPELINE_NAMES)}; offline), a local pipeline folder or a hub id such as "
            "Wan-AI/Wan2.1-T2V-1.3B-Diffusers (needs network access, or a copy in the Hugging Face cache)")


def _dense_with_sparsity(args) -> bool:
    from ..methods.base import parse_spec

    try:
        name, overrides = parse_spec(args.method)
    except ValueError:
        return False  # a malformed spec is reported when the method is made
    return name == "dense" and (args.sparsity is not None or "sparsity" in overrides)


def run(args) -> int:
    from ..testing.tiny import PIPELINE_NAMES, TINY_CALL_DEFAULTS

    tiny = args.model in PIPELINE_NAMES
    # A name that is neither a tiny model, a folder nor a hub id (org/name) fails here, not after a hub look-up.
    if not tiny and "/" not in args.model and not os.path.isdir(args.model):
        print(f"sparsediff generate: unknown model {args.model!r}: {_model_choices()}", file=sys.stderr)
        return 2
    if _dense_with_sparsity(args):
        print("sparsediff generate: --sparsity does not apply to --method dense (dense attention keeps every key "
              "block): drop --sparsity, or choose a sparse method such as ba_att", file=sys.stderr)
        return 2
    from ..eval.video_io import FFMPEG_SUFFIXES

    if os.path.splitext(args.out)[1].lower() not in (*FFMPEG_SUFFIXES, ".gif"):  # fail before generating
        print(f"sparsediff generate: --out {args.out!r}: write .mp4 ({', '.join(FFMPEG_SUFFIXES[1:])}) or .gif",
              file=sys.stderr)
        return 2

    from ..attention_processors import CaptureConfig, SparseAttnProcessor, model_family, transformers_of
    from ..pipelines.generate import check_frames, generate_video

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype or ("bfloat16" if torch.device(device).type == "cuda" else "float32"))
    tiny_frames, tiny_height, tiny_width = TINY_CALL_DEFAULTS[PIPELINE_NAMES[args.model]] if tiny else (None,) * 3
    defaults = {"frames": tiny_frames, "height": tiny_height, "width": tiny_width, "steps": TINY_STEPS} if tiny \
        else REAL_DEFAULTS
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    capture = None
    if args.capture_dir:
        capture = CaptureConfig(args.capture_dir, layers=args.capture_layers, steps=args.capture_steps)
    try:
        processor = SparseAttnProcessor(args.method, capture=capture, **method_overrides(args, tiny))
    except (TypeError, ValueError) as err:
        print(f"sparsediff generate: {err}", file=sys.stderr)
        return 2

    try:
        pipe = load_pipeline(args.model, dtype, device)
    except (OSError, ValueError) as err:  # not on the hub, no network, not a pipeline folder
        logger.info("loading %s failed", args.model, exc_info=True)  # the whole story with -v
        reason = (str(err).strip().splitlines() or [""])[0]
        reason = reason if len(reason) <= 160 else reason[:157] + "..."  # hub errors run on for lines
        print(f"sparsediff generate: cannot load {args.model!r} ({type(err).__name__}: {reason}); {_model_choices()}",
              file=sys.stderr)
        return 2
    kwargs = _call_kwargs(pipe, args, tiny, device)
    try:
        check_frames(pipe, args.frames, args.model, kwargs.get("causal_block_size"))
    except ValueError as err:
        print(f"sparsediff generate: {err}", file=sys.stderr)
        return 2
    family = model_family(transformers_of(pipe)[0])
    size = f"{args.frames}x{args.height}x{args.width}"
    print(f"{type(pipe).__name__} ({family}) on {device}, {dtype}: {size}, {args.steps} steps; {processor!r}")

    if args.compare_dense and args.warmup_steps > 0:  # one-off costs stay out of both timed runs
        pipe.set_progress_bar_config(desc="warm-up")
        for proc in (processor, None):
            warm = dict(_call_kwargs(pipe, args, tiny, device), num_inference_steps=args.warmup_steps)
            generate_video(pipe, proc, device=device, **warm)
    pipe.set_progress_bar_config(desc=f"{processor.method.name}")
    sparse = generate_video(pipe, processor, device=device, **kwargs)
    video = write_video(args.out, sparse.frames, args.fps)
    report = {"model": args.model, "family": family, "pipeline": type(pipe).__name__,
              "call": {k: args.__dict__[k] for k in ("prompt", "frames", "height", "width", "steps", "seed")},
              "dtype": str(dtype), "environment": _environment(device), "video": os.path.abspath(video),
              "sparse": sparse.summary()}
    if args.compare_dense:
        from ..eval.video_metrics import compare_videos

        pipe.set_progress_bar_config(desc="dense")
        dense = generate_video(pipe, None, device=device, **_call_kwargs(pipe, args, tiny, device))
        dense_path = os.path.splitext(args.out)[0] + ".dense" + os.path.splitext(args.out)[1]
        dense_path = write_video(dense_path, dense.frames, args.fps)
        metrics = compare_videos(dense.frames, sparse.frames, layout="thwc")
        report["dense"] = {**dense.summary(), "video": os.path.abspath(dense_path)}
        report["fidelity"] = metrics
        # Medians over steps (after the warm-up), with the quartiles of the per-step ratio as the spread.
        n = min(len(dense.step_seconds), len(sparse.step_seconds))
        ratios = np.array(dense.step_seconds[:n]) / np.maximum(np.array(sparse.step_seconds[:n]), 1e-12)
        report["speedup"] = {"step_median": dense.median_step_seconds / max(sparse.median_step_seconds, 1e-12),
                             "step_ratio_quartiles": [float(x) for x in np.percentile(ratios, [25, 75])],
                             "attention_median": dense.median_attention_seconds
                             / max(sparse.median_attention_seconds, 1e-12),
                             "warmup_steps": args.warmup_steps, "timed_steps": n}
    report_path = os.path.splitext(args.out)[0] + ".json"
    with open(report_path, "w") as f:
        json.dump(strict_json(report), f, indent=2, default=str, allow_nan=False)
    _print_summary(report, report_path)
    return 0


def describe_routes(processor: dict) -> str:
    """One line on what ran: the share of routed attention calls that went sparse, the kept density, and the
    reason of every dense fallback."""
    from ..methods.base import DENSE_REASONS

    routes = dict(processor.get("routes") or {})
    cross = routes.pop("dense_cross", 0)
    total = sum(routes.values())
    if processor.get("method") == "dense":
        return f"dense attention on {total} routed calls" + (f" (+{cross} cross-attention)" if cross else "")
    sparse = routes.pop("sparse", 0)
    text = f"{sparse} of {total} routed attention calls ran {processor.get('method')}"
    density = processor.get("realised_density", processor.get("density"))
    if density is not None:
        text += f" (kept density {density:.3f})"
    if routes:
        why = {"dense_mask": "an unsupported mask", "dense_dropout": "dropout on",
               "dense_backend": "an attention backend that bypasses SDPA"}
        text += "; dense: " + ", ".join(f"{n} ({why.get(r) or DENSE_REASONS.get(r, r)})" for r, n in routes.items())
    if cross:
        text += f"; {cross} cross-attention calls dense by design"
    return text


def _print_summary(report: dict, report_path: str) -> None:
    s = report["sparse"]  # the run of --method, which may be dense
    method = s["processor"]["method"]
    label = "dense: " if method == "dense" else "sparse:"
    print(f"video: {report['video']}\nreport: {report_path}")
    print(f"{label} {s['denoising_seconds']:.2f} s denoising, attention {100 * s['attention_share']:.1f}% of it")
    print(f"        {describe_routes(s['processor'])}")
    if "dense" in report:
        d, f = report["dense"], report["fidelity"]
        speed = report["speedup"]
        print(f"dense:  {d['denoising_seconds']:.2f} s denoising, attention {100 * d['attention_share']:.1f}% of it")
        psnr = "identical frames" if f["psnr"] == math.inf else f"PSNR {f['psnr']:.2f} dB, SSIM {f['ssim']:.4f}"
        lo, hi = speed["step_ratio_quartiles"]
        print(f"speed-up per step (median of {speed['timed_steps']} steps after {speed['warmup_steps']} warm-up) "
              f"{speed['step_median']:.2f}x (quartiles {lo:.2f}-{hi:.2f}), attention "
              f"{speed['attention_median']:.2f}x; {psnr} vs dense")
        if method != "dense" and not s["processor"].get("routes", {}).get("sparse"):
            print(f"warning: no attention call ran {method}, so both runs are dense and the speed-up is noise; "
                  "see the reasons above")
        if str(report["model"]).startswith("tiny-"):
            print("note: tiny models attend over a few hundred tokens, where choosing blocks costs more than it "
                  "saves; the speed-ups come at long sequences (e.g. 32k tokens for 81x480x832 on Wan), "
                  "see docs/benchmarks.md")
