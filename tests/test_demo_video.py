"""Video tab callbacks on the tiny models: two videos, per-step timings, PSNR/SSIM, a mask heatmap;
bad parameters become messages; Stop ends a run; the app and ``sparsediff demo`` wiring."""

import os
import threading

import pytest
import torch

from sparsediff.commands.demo import load_app

pytest.importorskip("gradio", reason="the demo needs gradio (the 'demo' extra)")
from sparsediff.testing.tolerance import ROUNDING, tolerance

load_app()  # puts the checkout root on sys.path, as `sparsediff demo` does
from demos.common import Cancelled, DemoInputError  # noqa: E402
from demos.video import VideoRequest, kept_masks, run_video  # noqa: E402

SMALL = dict(frames=9, height=64, width=64, steps=3)


@pytest.fixture(autouse=True)
def _outputs(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSEDIFF_DEMO_DIR", str(tmp_path))


def test_video_dense_vs_ba_att():
    result = run_video(VideoRequest(method="BA-Att", sparsity=0.5, **SMALL), device="cpu")
    assert result.dense_video != result.sparse_video
    for path in (result.dense_video, result.sparse_video):
        assert path.endswith(".mp4") and os.path.getsize(path) > 1000
    assert len(result.step_rows) == SMALL["steps"] and all(r[1] > 0 and r[2] > 0 for r in result.step_rows)
    assert "Speed-up" in result.timing_markdown and "PSNR" in result.metrics_markdown
    fidelity = result.report["fidelity"]
    assert fidelity["psnr"] > 10 and 0.0 < fidelity["ssim"] <= 1.0
    assert result.report["processor"]["sparsity"] == 0.5
    with open(result.heatmap, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_flashblock_on_block_causal_model_matches_dense():
    # FlashBlock without a budget caches exact external attention: the video equals dense to rounding.
    result = run_video(VideoRequest(model="tiny-skyreels-df", method="FlashBlock", sparsity=0.0, frames=13,
                                    height=64, width=64, steps=2), device="cpu")
    assert result.report["fidelity"]["psnr"] > 50
    assert os.path.exists(result.sparse_video)


def test_kept_masks_budget_and_mass():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 64, 8, generator=g) for _ in range(3))
    full = kept_masks(q, k, v, sparsity=0.0, beta=0.5, block_size=16)
    for mask, mass in full.values():
        assert bool(mask.all())
        torch.testing.assert_close(mass, torch.ones_like(mass), **tolerance(torch.float32, ulps=ROUNDING))
    half = kept_masks(q, k, v, sparsity=0.5, beta=0.5, block_size=16, frame_size=32)
    for mask, mass in half.values():
        assert mask.shape == (1, 2, 4, 4) and mask.sum(-1).eq(2).all()
        assert bool((mass > 0).all() and (mass < 1).all())


@pytest.mark.parametrize("change, message", [
    (dict(frames=16), "4k+1"),
    (dict(sparsity=1.0), "[0, 1)"),
    (dict(sparsity=-0.1), "[0, 1)"),
    (dict(prompt="   "), "prompt is empty"),
    (dict(model="no such model"), "unknown model"),
    (dict(model="Wan-AI/Wan2.1-T2V-1.3B-Diffusers"), "needs a GPU"),
    (dict(method="FlashBlock"), "block-causal"),
    (dict(height=72), "multiple of 16"),
    (dict(method="Magic"), "unknown method"),
    (dict(steps=0), "steps"),
])
def test_bad_video_inputs_give_messages(change, message):
    with pytest.raises(DemoInputError) as err:
        run_video(VideoRequest(**{**SMALL, **change}), device="cpu")
    assert message in str(err.value)


def test_stop_ends_a_run():
    flag = threading.Event()
    flag.set()
    with pytest.raises(Cancelled):
        run_video(VideoRequest(**SMALL), device="cpu", cancel=flag)


def test_app_callback_reports_bad_inputs_in_status():
    from demos.app import stop_callback, video_callback

    with pytest.warns(UserWarning, match="4k"):  # gr.Warning: a toast in the browser
        out = video_callback("tiny-wan", "a cat", 16, 64, 64, 3, "BA-Att", 0.5, 0.5, True, 0, 1, 0)
    assert out[0].startswith("**Invalid input:**") and "4k+1" in out[0]
    assert out[1] is None and out[2] is None
    assert stop_callback() == "Nothing is running."


def test_app_builds_with_a_queue():
    from demos.app import build_demo

    demo = build_demo()
    assert demo._queue is not None and demo._queue.default_concurrency_limit == 1
    names = {fn.api_name for fn in demo.fns.values()}
    assert {"video", "text", "video_stop", "text_stop", "needle"} <= names


def test_demo_command_arguments():
    import argparse

    from sparsediff.commands import demo as demo_cli

    parser = argparse.ArgumentParser()
    demo_cli.add_arguments(parser)
    args = parser.parse_args(["--port", "7999", "--share"])
    assert (args.host, args.port, args.share) == ("127.0.0.1", 7999, True)
    assert callable(demo_cli.load_app().launch)
