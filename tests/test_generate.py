"""``sparsediff generate`` end to end on tiny random-weight pipelines (CPU)."""

import json
import re
import sys

import imageio.v2 as imageio
import numpy as np
import pytest

from sparsediff.cli import main
from sparsediff.eval import video_io
from sparsediff.testing.tiny import PIPELINE_NAMES

# Asked for .mp4, the command writes .mp4 with imageio-ffmpeg and a .gif of the same name without it.
VIDEO = ".mp4" if video_io.ffmpeg_available() else ".gif"


def test_generate_tiny_wan_with_dense_comparison(tmp_path):
    out = tmp_path / "wan.mp4"
    rc = main(["generate", "--model", "tiny-wan", "--method", "ba_att", "--sparsity", "0.5", "--steps", "3",
               "--dense-steps", "1", "--out", str(out), "--compare-dense", "--seed", "1"])
    assert rc == 0
    report = json.loads((tmp_path / "wan.json").read_text())
    assert report["video"] == str(tmp_path / f"wan{VIDEO}")
    frames = imageio.mimread(report["video"])
    assert len(frames) == 17 and frames[0].shape == (128, 128, 3)
    assert report["dense"]["video"] == str(tmp_path / f"wan.dense{VIDEO}")
    assert (tmp_path / f"wan.dense{VIDEO}").exists()
    sparse, dense = report["sparse"], report["dense"]
    assert report["family"] == "wan" and report["pipeline"] == "WanPipeline"
    assert sparse["processor"]["method"] == "ba_att" and sparse["processor"]["sparsity"] == 0.5
    assert sparse["processor"]["dense_steps"] == 1
    assert dense["processor"]["method"] == "dense"
    for run in (sparse, dense):
        assert len(run["step_seconds"]) == 3 and len(run["step_attention_seconds"]) == 3
        assert 0.0 < run["attention_share"] < 1.0
    fidelity = report["fidelity"]
    assert len(fidelity["psnr_per_frame"]) == 17
    assert fidelity["psnr"] > 20.0 and 0.5 < fidelity["ssim"] <= 1.0  # sparse stays close to dense
    assert report["speedup"]["step_median"] > 0 and report["speedup"]["warmup_steps"] == 2
    # The tiny defaults are long enough for the budget to bite: the sparse steps really ran sparse.
    routes = sparse["processor"]["routes"]
    assert routes["sparse"] > 0 and routes["dense_step"] > 0 and routes["dense_cross"] > 0
    assert 0.4 < sparse["processor"]["realised_density"] < 0.6
    assert fidelity["psnr"] < 200  # and the output differs from dense


def test_report_flags_a_run_where_nothing_ran_sparse(tmp_path, capsys):
    """FlashBlock on a model without block-causal frames has no cached prefix: every call runs dense, and the
    report says so instead of printing a speed-up of dense over dense; identical frames give JSON null."""
    out = tmp_path / "fb.mp4"
    rc = main(["generate", "--model", "tiny-wan", "--method", "flashblock", "--steps", "2", "--out", str(out),
               "--compare-dense", "--warmup-steps", "0"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert re.search(r"\b0 of \d+ routed attention calls ran flashblock", printed) and "no cached prefix" in printed
    assert "warning: no attention call ran flashblock" in printed
    text = (tmp_path / "fb.json").read_text()
    assert "Infinity" not in text and "NaN" not in text
    report = json.loads(text)
    assert report["fidelity"]["psnr"] is None and "identical" in report["fidelity"]["psnr_note"]


# Every tiny model the command offers builds offline and runs (tiny-wan above).
@pytest.mark.parametrize("model", sorted(set(PIPELINE_NAMES) - {"tiny-wan"}))
def test_generate_other_tiny_families(tmp_path, model):
    out = tmp_path / "video.mp4"
    assert main(["generate", "--model", model, "--steps", "2", "--out", str(out)]) == 0
    report = json.loads((tmp_path / "video.json").read_text())
    assert len(report["sparse"]["step_seconds"]) == 2
    assert report["video"] == str(tmp_path / f"video{VIDEO}")
    assert len(imageio.mimread(report["video"])) == report["call"]["frames"]


def test_generate_flashblock_on_the_tiny_diffusion_forcing_model(tmp_path, capsys):
    out = tmp_path / "df.mp4"
    assert main(["generate", "--model", "tiny-skyreels-df", "--method", "flashblock", "--steps", "2",
                 "--out", str(out)]) == 0
    report = json.loads((tmp_path / "df.json").read_text())
    assert report["pipeline"] == "SkyReelsV2DiffusionForcingPipeline" and report["call"]["frames"] == 13
    assert report["sparse"]["processor"]["method"] == "flashblock"
    assert report["video"] == str(tmp_path / f"df{VIDEO}")
    assert len(imageio.mimread(report["video"])) == 13
    # two latent frames per causal block: 9 frames (3 latent frames) leave half a block
    assert main(["generate", "--model", "tiny-skyreels-df", "--frames", "9", "--out", str(out)]) == 2
    assert "2 latent frames per causal block" in capsys.readouterr().err


def test_generate_help_lists_every_tiny_model(capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    text = "".join(capsys.readouterr().out.split())  # argparse wraps lines at hyphens
    assert all(name in text for name in PIPELINE_NAMES)


def test_generate_rejects_bad_method_settings(tmp_path, capsys):
    assert main(["generate", "--model", "tiny-wan", "--sparsity", "1.5", "--out", str(tmp_path / "x.mp4")]) == 2
    assert "sparsity" in capsys.readouterr().err


def test_generate_rejects_frame_counts_the_model_cannot_make(tmp_path, capsys):
    # Wan-style VAEs decode 4k+1 frames; the pipeline would round 7 down to 5 while the report said 7.
    out = tmp_path / "x.mp4"
    assert main(["generate", "--model", "tiny-wan", "--frames", "7", "--out", str(out)]) == 2
    assert capsys.readouterr().err.strip() == "sparsediff generate: tiny-wan needs frames = 4k+1 (e.g. 5 or 9), got 7"
    assert not out.exists()


def test_generate_unknown_model_name_fails_before_any_hub_lookup(tmp_path, monkeypatch, capsys):
    import diffusers

    def no_lookup(*args, **kwargs):
        raise AssertionError("a name without a slash is no hub id: nothing should be loaded")

    monkeypatch.setattr(diffusers.DiffusionPipeline, "from_pretrained", no_lookup)
    assert main(["generate", "--model", "nosuch-model", "--out", str(tmp_path / "x.mp4")]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("sparsediff generate: unknown model 'nosuch-model': use a tiny model (tiny-wan, ")
    assert all(name in line for name in PIPELINE_NAMES) and "network" in line


def test_generate_model_that_cannot_load_gives_one_line(tmp_path, monkeypatch, capsys):
    import diffusers

    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files.\nCheck your connection.")

    monkeypatch.setattr(diffusers.DiffusionPipeline, "from_pretrained", offline)
    assert main(["generate", "--model", "some-org/some-model", "--out", str(tmp_path / "x.mp4")]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "cannot load 'some-org/some-model' (OSError: We couldn't connect" in line and "tiny-wan" in line
    monkeypatch.undo()
    # a folder that holds no pipeline (a real load, no network involved)
    assert main(["generate", "--model", str(tmp_path), "--out", str(tmp_path / "x.mp4")]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"sparsediff generate: cannot load {str(tmp_path)!r}")


@pytest.mark.parametrize("argv", [["--method", "dense", "--sparsity", "0.5"], ["--method", "dense:0.5"]])
def test_generate_dense_takes_no_sparsity(tmp_path, capsys, argv):
    assert main(["generate", *argv, "--out", str(tmp_path / "x.mp4")]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("sparsediff generate: --sparsity does not apply to --method dense")


def test_generate_dense_run_is_labelled_dense(tmp_path, capsys):
    assert main(["generate", "--method", "dense", "--steps", "1", "--out", str(tmp_path / "d.mp4")]) == 0
    out = capsys.readouterr().out
    assert "\ndense:  " in out and "sparse:" not in out


def test_videos_fall_back_to_gif_without_the_ffmpeg_plugin(tmp_path, monkeypatch, caplog):
    """Without imageio-ffmpeg imageio hands .mp4 to its TIFF plugin (which fails on fps): the writer asks for the
    FFMPEG plugin by name and, when it is missing, writes a .gif of the same name and says how to get .mp4."""
    monkeypatch.setitem(sys.modules, "imageio_ffmpeg", None)  # import imageio_ffmpeg now raises ImportError
    monkeypatch.setattr(video_io, "_warned_no_ffmpeg", False)
    assert not video_io.ffmpeg_available()
    frames = np.stack([np.full((16, 24, 3), 20 * i, dtype=np.uint8) for i in range(5)])
    with caplog.at_level("WARNING", logger="sparsediff.eval.video_io"):
        written = video_io.write_video(tmp_path / "v.mp4", frames, fps=8)
    assert written == tmp_path / "v.gif" and not (tmp_path / "v.mp4").exists()
    assert "pip install imageio[ffmpeg]" in caplog.text
    back = imageio.mimread(str(written))
    assert len(back) == 5 and back[0].shape == (16, 24, 3)
    assert [int(f[0, 0, 0]) for f in back] == [20 * i for i in range(5)]
    with pytest.raises(ValueError, match="suffix '.tif'"):
        video_io.write_video(tmp_path / "v.tif", frames)


def test_generate_rejects_an_output_it_cannot_write(tmp_path, capsys):
    assert main(["generate", "--out", str(tmp_path / "x.tif")]) == 2
    assert "write .mp4" in capsys.readouterr().err and not (tmp_path / "x.tif").exists()
