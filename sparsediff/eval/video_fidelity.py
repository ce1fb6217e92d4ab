"""Video fidelity, sparse vs dense: the same prompt and seed through a diffusers video pipeline with
each method; PSNR and SSIM per frame and averaged (LPIPS when the ``lpips`` package and its weights are
available locally), and the per-step difference of the latents (captured with
``callback_on_step_end``). One JSONL per method, one line per prompt; resumable like the QA benchmarks.

Work is prompt-major: dense first (its frames are saved, its latents kept in memory), then each method.
A resumed run that still needs a method for a prompt re-runs dense for that prompt's latents (same
seed, same result) without writing its record again.
"""

from __future__ import annotations

import json
import logging
import re
import time
from pathlib import Path

import numpy as np

from .records import RecordWriter, strict_json
from .runner import (
    BASELINE,
    _progress,
    close_run,
    load_results,
    method_slug,
    parse_methods,
    results_path,
    select,
    write_atomic,
)

logger = logging.getLogger(__name__)


# -- scores ----------------------------------------------------------------------------------------------------
def _as_float_video(x):
    import torch

    x = torch.as_tensor(np.asarray(x))
    return x.float() / 255.0 if x.dtype == torch.uint8 else x.float()


def frame_scores(frames, reference) -> tuple[list[float], list[float]]:
    """PSNR (dB; inf where identical) and SSIM of each frame of ``frames`` against ``reference``,
    both (T, H, W, C) uint8 or float in [0, 1]; computed by ``sparsediff.eval.video_metrics``."""
    from .video_metrics import psnr_per_frame, ssim_per_frame

    a, b = _as_float_video(reference), _as_float_video(frames)
    return ([float(v) for v in psnr_per_frame(a, b, layout="thwc")],
            [float(v) for v in ssim_per_frame(a, b, layout="thwc")])


def _finite_mean(values):
    """Mean of the finite values; inf when there are none (identical frames: strict JSON writes null + a note)."""
    values = [v for v in values if v is not None and np.isfinite(v)]
    return float(np.mean(values)) if values else float("inf")


class LPIPS:
    """LPIPS (AlexNet) if the package and its weights load without a download; otherwise ``None``."""

    @staticmethod
    def load(device="cpu"):
        try:
            import lpips
        except ImportError:
            logger.warning("LPIPS skipped: the lpips package is not installed (pip install lpips)")
            return None
        try:
            model = lpips.LPIPS(net="alex", verbose=False).eval().to(device)
        except Exception as err:  # weights missing offline
            logger.warning("LPIPS skipped: its weights are not available locally (%s)", err)
            return None
        return LPIPS(model, device)

    def __init__(self, model, device):
        self.model, self.device = model, device

    def per_frame(self, a, b) -> list[float]:
        import torch

        x, y = ((_as_float_video(v).permute(0, 3, 1, 2) * 2 - 1).to(self.device) for v in (a, b))
        with torch.no_grad():
            return [float(d) for d in self.model(x, y).flatten()]


def latent_differences(dense, other) -> list[float]:
    """Relative L2 distance per denoising step: ||x_method - x_dense|| / ||x_dense||."""
    out = []
    for d, o in zip(dense, other):
        d, o = d.float(), o.float()
        out.append(float((o - d).norm() / d.norm().clamp_min(1e-12)))
    return out


# -- generation -----------------------------------------------------------------------------------------------
def to_uint8_frames(frames) -> np.ndarray:
    """The first video of a pipeline output (np / torch / PIL list) as (T, H, W, 3) uint8."""
    if isinstance(frames, (list, tuple)) and frames and not hasattr(frames[0], "shape"):
        frames = frames[0]  # list of lists of PIL images: the first video
    if isinstance(frames, (list, tuple)):
        frames = np.stack([np.asarray(f) for f in frames])
    arr = frames.detach().float().cpu().numpy() if hasattr(frames, "detach") else np.asarray(frames)
    if arr.ndim == 5:
        arr = arr[0]
    if arr.dtype != np.uint8:
        arr = (np.clip(arr, 0, 1) * 255).round().astype(np.uint8)
    return arr[..., :3]


class PipelineRunner:
    """Runs a diffusers video pipeline with fixed settings, capturing latents at each step's end."""

    def __init__(self, pipe, *, num_frames=None, height=None, width=None, steps=50, guidance_scale=None,
                 seed=0, device=None, extra=None, enable=None, disable=None, method_defaults=None):
        self.pipe = pipe
        self.kwargs = {k: v for k, v in dict(num_frames=num_frames, height=height, width=width,
                                              num_inference_steps=steps, guidance_scale=guidance_scale).items()
                       if v is not None}
        self.kwargs.update(extra or {})
        self.seed, self.device = seed, device
        self._enable, self._disable = enable, disable
        self._methods, self.active = {}, None
        self.method_defaults = dict(method_defaults or {})  # config fields a spec does not set itself
        if hasattr(pipe, "set_progress_bar_config"):
            pipe.set_progress_bar_config(disable=True)  # our own bar counts prompts x methods

    def set_method(self, spec: str) -> None:
        from ..api import disable, enable
        from ..methods import make_method

        if spec == self.active or (spec == BASELINE and self.active is None):
            return
        if self.active is not None:
            (self._disable or disable)(self.pipe)
            self.active = None
        if spec != BASELINE:
            if spec not in self._methods:
                from ..methods.base import parse_spec

                own = parse_spec(spec)[1]
                self._methods[spec] = make_method(
                    spec, **{k: v for k, v in self.method_defaults.items() if k not in own})
            (self._enable or enable)(self.pipe, self._methods[spec])
            self.active = spec

    def warmup(self, prompt: str, steps: int) -> None:
        """An untimed generation of ``steps`` steps with the active method: kernel compilation and caches stay
        out of the timed runs."""
        saved = self.kwargs.get("num_inference_steps")
        self.kwargs["num_inference_steps"] = steps
        try:
            self.generate(prompt)
        finally:
            if saved is None:
                self.kwargs.pop("num_inference_steps")
            else:
                self.kwargs["num_inference_steps"] = saved

    def routes(self) -> dict:
        """Attention calls of the last generation by route (``"sparse"`` or why one ran dense), summed over the
        sparsediff processors on the pipeline's transformers; empty when none is enabled."""
        import collections

        from ..attention_processors import SparseAttnProcessor

        found = {}
        for name in ("transformer", "transformer_2"):
            model = getattr(self.pipe, name, None)
            for proc in (getattr(model, "attn_processors", None) or {}).values():
                if isinstance(proc, SparseAttnProcessor):
                    found[id(proc)] = proc
        total = collections.Counter()
        for proc in found.values():
            total.update(proc.routes)
        return dict(total)

    def generate(self, prompt: str):
        """(frames uint8 (T, H, W, 3), latents per step on CPU, seconds)."""
        import torch

        from ..runtime import step_state

        latents = []

        def capture(pipe, step, timestep, callback_kwargs):
            latents.append(callback_kwargs["latents"].detach().to("cpu", torch.float16))
            return {}

        generator = torch.Generator(self.device or "cpu").manual_seed(self.seed)
        step_state.new_generation()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = self.pipe(prompt=prompt, generator=generator, output_type="np", callback_on_step_end=capture,
                        callback_on_step_end_tensor_inputs=["latents"], **self.kwargs)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        return to_uint8_frames(out.frames), latents, seconds


def read_prompts(path) -> list[tuple[str, str]]:
    """(id, prompt) per non-empty, non-# line; ids are "p000-first-words" so they survive edits elsewhere."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: prompt file not found")
    prompts = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            words = "-".join(re.findall(r"[a-z0-9]+", line.lower())[:4])
            prompts.append((f"p{len(prompts):03d}-{words}", line))
    if not prompts:
        raise ValueError(f"{path}: no prompts (one per line; # starts a comment)")
    return prompts


def save_video(frames: np.ndarray, path: Path, fps: int = 16) -> Path:
    """Returns the path written: a .gif instead of .mp4 without imageio-ffmpeg (see ``video_io.write_video``)."""
    from .video_io import write_video

    return write_video(path, frames, fps, macro_block_size=1)


def run_video_fidelity(runner: PipelineRunner, prompts, methods, out_dir, *, limit=None, shard=(0, 1),
                       lpips_device="cpu", save_videos=True, progress=True, run_info=None, warmup_steps=0) -> dict:
    methods = parse_methods(methods)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    prompts = select(list(prompts), limit, shard)
    write_atomic(out_dir / "run.json", json.dumps({"benchmark": "video-fidelity", "methods": methods,
                                                  **(run_info or {})}, indent=2, default=str) + "\n")
    writers = {m: RecordWriter(results_path(out_dir, m, shard)) for m in methods}
    lpips_model = LPIPS.load(lpips_device)
    done = sum(pid in writers[m].done for pid, _ in prompts for m in methods)
    bar = _progress(len(prompts) * len(methods), done, "video-fidelity", progress)
    try:
        todo = [(pid, prompt) for pid, prompt in prompts if not all(pid in w.done for w in writers.values())]
        if todo and warmup_steps > 0:  # one-off costs (compilation, caches) must not land in one method's time
            for method in methods:
                runner.set_method(method)
                runner.warmup(todo[0][1], warmup_steps)
        for pid, prompt in prompts:
            if all(pid in w.done for w in writers.values()):
                continue
            runner.set_method(BASELINE)
            dense_frames, dense_latents, dense_s = runner.generate(prompt)
            if save_videos:
                save_video(dense_frames, out_dir / "videos" / BASELINE / f"{pid}.mp4")
            if pid not in writers[BASELINE].done:
                writers[BASELINE].write(_record(pid, prompt, BASELINE, dense_s, dense_frames, dense_frames,
                                                dense_latents, dense_latents, lpips_model))
                _tick(bar)
            for method in methods[1:]:
                if pid in writers[method].done:
                    continue
                runner.set_method(method)
                frames, latents, seconds = runner.generate(prompt)
                if save_videos:
                    save_video(frames, out_dir / "videos" / method_slug(method) / f"{pid}.mp4")
                record = _record(pid, prompt, method, seconds, frames, dense_frames, latents, dense_latents,
                                 lpips_model, dense_s)
                writers[method].write(record | _route_fields(runner.routes()))
                _tick(bar)
    finally:
        close_run(bar, writers, runner)
    return write_fidelity_summary(out_dir, methods)


def _tick(bar):
    if bar is not None:
        bar.update(1)


def _record(pid, prompt, method, seconds, frames, dense_frames, latents, dense_latents, lpips_model,
            dense_seconds=None):
    if frames.shape != dense_frames.shape:
        raise ValueError(f"{pid}: {method} produced frames {frames.shape}, dense {dense_frames.shape}")
    psnr_t, ssim_t = frame_scores(frames, dense_frames)
    lp = lpips_model.per_frame(frames, dense_frames) if lpips_model is not None else None
    diffs = latent_differences(dense_latents, latents)
    return {"id": pid, "method": method, "prompt": prompt, "latency_s": round(seconds, 4),
            "dense_latency_s": round(dense_seconds if dense_seconds is not None else seconds, 4),
            "psnr": _finite_mean(psnr_t), "ssim": float(np.mean(ssim_t)),
            "lpips": float(np.mean(lp)) if lp is not None else None,
            "psnr_per_frame": psnr_t, "ssim_per_frame": ssim_t, "lpips_per_frame": lp,
            "latent_rel_l2_per_step": diffs, "latent_rel_l2_final": diffs[-1] if diffs else None,
            "frames": int(frames.shape[0]), "size": [int(frames.shape[1]), int(frames.shape[2])]}


def _route_fields(routes: dict) -> dict:
    """``routes`` and the share of self-/joint-attention calls that ran the method (cross-attention, dense by
    design, left out); ``sparse_share`` is None when nothing was routed."""
    from ..methods.base import sparse_share

    return {"routes": routes, "sparse_share": sparse_share(routes)}


def _mean_of(records, key):
    values = [r[key] for r in records if r.get(key) is not None]
    return float(np.mean(values)) if values else None


def write_fidelity_summary(out_dir, methods) -> dict:
    out_dir = Path(out_dir)
    rows = {}
    for method in methods:
        recs = load_results(out_dir, method)
        if not recs:
            continue
        lat = _mean_of(recs, "latency_s")
        rows[method] = {"n": len(recs), "psnr": _finite_mean([r["psnr"] for r in recs]),
                        "ssim": _mean_of(recs, "ssim"), "lpips": _mean_of(recs, "lpips"),
                        "latent_rel_l2_final": _mean_of(recs, "latent_rel_l2_final"), "latency_s": lat,
                        "speedup_vs_dense": (_mean_of(recs, "dense_latency_s") / lat) if lat else None,
                        "sparse_share": _mean_of(recs, "sparse_share")}
    summary = {"benchmark": "video-fidelity", "baseline": BASELINE, "methods": rows}
    write_atomic(out_dir / "summary.json", json.dumps(strict_json(summary), indent=2, allow_nan=False) + "\n")
    f = lambda v, spec: "–" if v is None else ("inf (identical)" if v == float("inf") else f"{v:{spec}}")
    lines = ["## video fidelity: sparse vs dense (same prompt, same seed)", "",
             "| method | prompts | PSNR (dB) | SSIM | LPIPS | latent rel. L2 (last step) | latency (s) | speedup "
             "| calls sparse |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    never = []
    for m, r in rows.items():
        share = r["sparse_share"]
        speedup = f(r["speedup_vs_dense"], ".2f") + "×"
        if m != BASELINE and share == 0:  # a speed-up without sparse attention is noise or warm-up, not the method
            speedup, _ = f"({speedup})", never.append(m)
        lines.append(f"| {m} | {r['n']} | {f(r['psnr'], '.2f')} | {f(r['ssim'], '.4f')} | {f(r['lpips'], '.4f')} | "
                     f"{f(r['latent_rel_l2_final'], '.4f')} | {f(r['latency_s'], '.2f')} | {speedup} | "
                     f"{'–' if share is None else f'{100 * share:.0f} %'} |")
    for m in never:
        lines += ["", f"No attention call ran sparse for {m} (see `routes` in its records): its output is dense "
                      "attention's and its speed-up (in brackets) is not the method's."]
    write_atomic(out_dir / "summary.md", "\n".join(lines) + "\n")
    return summary
