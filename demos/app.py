"""Gradio app: dense vs sparse attention side by side, for video and long text.

    sparsediff demo --host 127.0.0.1 --port 7860        # or, from the repository root:
    python -m demos.app --port 7860

Jobs run one at a time (queue concurrency 1), so two users never share a model mid-generation; Stop
ends the caller's own job within one denoising step. Bad parameters show a message, never a traceback.
"""

from __future__ import annotations

import argparse
import logging

import gradio as gr

from .common import CANCEL, Cancelled, DemoInputError, output_dir
from .text import DIFFUSION_LM, TextRequest, available_models, needle_prompt, run_text
from .text import METHODS as TEXT_METHODS
from .video import METHODS as VIDEO_METHODS
from .video import TINY_MODELS, VideoRequest, run_video

logger = logging.getLogger(__name__)

STEP_HEADERS = ["step", "dense s", "sparse s", "speed-up"]
TEXT_HEADERS = ["block", "step", "dense s", "sparse s", "masked left", "stable share"]


def _session(request) -> str | None:
    return getattr(request, "session_hash", None) if request is not None else None


def _run_guarded(job, session):
    """Run ``job(cancel_flag)``; return ``(result, None)`` or ``(None, message)`` for the status box."""
    flag = CANCEL.start(session)
    try:
        return job(flag), None
    except DemoInputError as err:
        gr.Warning(str(err))
        return None, f"**Invalid input:** {err}"
    except Cancelled:
        return None, "**Stopped.**"
    except Exception as err:  # noqa: BLE001 -- shown to the user, logged in full for the operator
        logger.exception("demo job failed")
        gr.Warning(f"{type(err).__name__}: {err}")
        return None, f"**Internal error:** {type(err).__name__}: {err}"
    finally:
        CANCEL.finish(session, flag)


def video_callback(model, prompt, frames, height, width, steps, method, sparsity, beta, norm_sort, seed, layer,
                   head, request: gr.Request = None, progress=gr.Progress(track_tqdm=True)):  # noqa: B008 -- Gradio injects it
    """Outputs: status, dense video, sparse video, timing, quality, per-step table, heatmap, report."""
    req = VideoRequest(model=model, prompt=prompt, frames=frames, height=height, width=width, steps=steps,
                       method=method, sparsity=sparsity, beta=beta, norm_sort=norm_sort, seed=seed or 0,
                       layer=layer, head=head)
    result, message = _run_guarded(lambda flag: run_video(req, progress=progress, cancel=flag), _session(request))
    if result is None:
        return message, None, None, "", "", [], None, {}
    status = f"**Done:** {req.model}, {req.frames} frames {req.height}x{req.width}, {req.steps} steps, {req.method}"
    return (status, result.dense_video, result.sparse_video, result.timing_markdown, result.metrics_markdown,
            result.step_rows, result.heatmap, result.report)


def text_callback(model, context, method, sparsity, threshold, gen_length, block_length, steps_per_block,
                  request: gr.Request = None, progress=gr.Progress()):  # noqa: B008 -- Gradio injects it
    """Outputs: status, dense answer, sparse answer, summary, per-step progress table, report."""
    req = TextRequest(model=model, context=context, method=method, sparsity=sparsity, threshold=threshold,
                      gen_length=gen_length, block_length=block_length, steps_per_block=steps_per_block)
    result, message = _run_guarded(lambda flag: run_text(req, progress=progress, cancel=flag), _session(request))
    if result is None:
        return message, "", "", "", [], {}
    return (f"**Done:** {req.model}, {req.method}", result.dense_answer, result.sparse_answer,
            result.summary_markdown, result.progress_rows, result.report)


def needle_callback(tokens, seed):
    try:
        prompt, answer = needle_prompt(tokens, int(seed or 0))
    except DemoInputError as err:
        gr.Warning(str(err))
        return gr.update(), gr.update()
    return prompt, answer


def stop_callback(request: gr.Request = None):
    running = CANCEL.stop(_session(request))
    return "Stopping after the current step..." if running else "Nothing is running."


def _video_tab():
    with gr.Row():
        with gr.Column(scale=1):
            model = gr.Dropdown(list(TINY_MODELS), value=TINY_MODELS[0], allow_custom_value=True, label="Model",
                                info="tiny models run on a CPU; a diffusers hub id or local folder needs a GPU")
            prompt = gr.Textbox("a red cat walks on the beach at sunset", label="Prompt", lines=2)
            with gr.Row():
                frames = gr.Number(17, precision=0, label="Frames", info="Wan: 4k+1")
                height = gr.Number(128, precision=0, label="Height")
                width = gr.Number(128, precision=0, label="Width")
                steps = gr.Number(4, precision=0, label="Steps")
            method = gr.Radio(list(VIDEO_METHODS), value="BA-Att", label="Sparse method",
                              info="FlashBlock needs a block-causal model (tiny-skyreels-df)")
            with gr.Row():
                sparsity = gr.Number(0.5, label="Sparsity", info="share of key blocks skipped, in [0, 1)")
                beta = gr.Number(0.5, label="Beta (BA-Att)",
                                 info="variance weight of the paper's pooled estimate (heatmap)")
            with gr.Row():
                norm_sort = gr.Checkbox(True, label="Norm sorting (BA-Att)")
                seed = gr.Number(0, precision=0, label="Seed")
            with gr.Row():
                layer = gr.Number(1, precision=0, label="Heatmap layer")
                head = gr.Number(0, precision=0, label="Heatmap head")
            with gr.Row():
                run = gr.Button("Generate", variant="primary", elem_id="video-generate")
                stop = gr.Button("Stop", variant="stop", elem_id="video-stop")
        with gr.Column(scale=2):
            status = gr.Markdown("Press Generate: dense and sparse runs with the same seed.", elem_id="video-status")
            with gr.Row():
                dense_video = gr.Video(label="Dense", elem_id="dense-video", autoplay=True, loop=True)
                sparse_video = gr.Video(label="Sparse", elem_id="sparse-video", autoplay=True, loop=True)
            timing = gr.Markdown(elem_id="video-timing")
            quality = gr.Markdown(elem_id="video-quality")
            heatmap = gr.Image(label="Kept key blocks (BA-Att), before and after norm sorting", type="filepath",
                               elem_id="mask-heatmap")
            with gr.Accordion("Per-step times and report", open=False):
                table = gr.Dataframe(headers=STEP_HEADERS, label="Per-step wall time")
                report = gr.JSON(label="Report")
    inputs = [model, prompt, frames, height, width, steps, method, sparsity, beta, norm_sort, seed, layer, head]
    outputs = [status, dense_video, sparse_video, timing, quality, table, heatmap, report]
    event = run.click(video_callback, inputs, outputs, concurrency_id="models", api_name="video")
    stop.click(stop_callback, None, status, cancels=[event], queue=False, api_name="video_stop")


def _text_tab():
    models = available_models()
    try:  # start with a prompt that runs as it is: a needle in a haystack
        first_prompt, first_answer = needle_prompt(1024, 0)
    except Exception:  # noqa: BLE001 -- the button still offers it
        first_prompt, first_answer = "", ""
    with gr.Row():
        with gr.Column(scale=1):
            model = gr.Dropdown(models, value=models[0], allow_custom_value=True, label="Model",
                                info=f"{DIFFUSION_LM}: block diffusion (all methods); causal LMs: BA-Att, SparseD")
            context = gr.Textbox(first_prompt, label="Long context (prompt)", lines=8, max_lines=16,
                                 elem_id="text-context",
                                 placeholder="Paste a long text, or insert a needle-in-a-haystack prompt below")
            with gr.Row():
                needle_tokens = gr.Number(1024, precision=0, label="Needle prompt length (tokens)")
                needle_seed = gr.Number(0, precision=0, label="Needle seed")
            needle = gr.Button("Insert needle-in-a-haystack prompt", elem_id="text-needle")
            expected = gr.Textbox(first_answer, label="Expected answer (needle)", interactive=False)
            method = gr.Radio(list(TEXT_METHODS), value="LoSA" if DIFFUSION_LM in models else "BA-Att",
                              label="Sparse method")
            with gr.Row():
                sparsity = gr.Number(0.5, label="Sparsity", info="in [0, 1)")
                threshold = gr.Number(0.05, label="Stable threshold (LoSA)")
            with gr.Row():
                gen_length = gr.Number(32, precision=0, label="Answer tokens")
                block_length = gr.Number(16, precision=0, label="Block length")
                steps_per_block = gr.Number(4, precision=0, label="Steps per block")
            with gr.Row():
                run = gr.Button("Generate", variant="primary", elem_id="text-generate")
                stop = gr.Button("Stop", variant="stop", elem_id="text-stop")
        with gr.Column(scale=2):
            status = gr.Markdown("Press Generate (a needle prompt is filled in; paste your own text to replace it).",
                                 elem_id="text-status")
            with gr.Row():
                dense_answer = gr.Textbox(label="Dense answer", lines=4, elem_id="dense-answer")
                sparse_answer = gr.Textbox(label="Sparse answer", lines=4, elem_id="sparse-answer")
            summary = gr.Markdown(elem_id="text-summary")
            table = gr.Dataframe(headers=TEXT_HEADERS, label="Block-diffusion progress (per step)")
            with gr.Accordion("Report", open=False):
                report = gr.JSON(label="Report")
    needle.click(needle_callback, [needle_tokens, needle_seed], [context, expected], queue=False, api_name="needle")
    inputs = [model, context, method, sparsity, threshold, gen_length, block_length, steps_per_block]
    event = run.click(text_callback, inputs, [status, dense_answer, sparse_answer, summary, table, report],
                      concurrency_id="models", api_name="text")
    stop.click(stop_callback, None, status, cancels=[event], queue=False, api_name="text_stop")


def build_demo() -> gr.Blocks:
    with gr.Blocks(title="sparsediff: dense vs sparse attention") as demo:
        gr.Markdown("# sparsediff: dense vs sparse attention\nThe same generation twice, dense and with a "
                    "block-sparse method, side by side. Tiny random-weight models run on a CPU: their outputs "
                    "are noise, but timing, fidelity and the kept-block masks are real.")
        with gr.Tab("Video", id="video"):
            _video_tab()
        with gr.Tab("Long text", id="text"):
            _text_tab()
    # Both tabs share one concurrency id, so a video and a text job never run at the same time either.
    demo.queue(default_concurrency_limit=1)
    return demo


def launch(host: str = "127.0.0.1", port: int = 7860, share: bool = False, **kwargs):
    demo = build_demo()
    return demo.launch(server_name=host, server_port=port, share=share, allowed_paths=[output_dir()], **kwargs)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--share", action="store_true", help="also open a public Gradio link")
    args = parser.parse_args(argv)
    launch(args.host, args.port, args.share)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
