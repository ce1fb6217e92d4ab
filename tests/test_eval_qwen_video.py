"""The torch-only Qwen2-VL / Qwen2.5-VL video inputs (``sparsediff.eval.qwen_video``): patches against
transformers' image processor, placeholder expansion against the processor itself, and Video-MME end to
end with a tiny random-weight Qwen2.5-VL whose processor has no video processor."""

import json
import logging

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessorPil  # noqa: E402

from sparsediff.cli import main  # noqa: E402
from sparsediff.eval import qwen_video, standins  # noqa: E402
from sparsediff.eval.records import read_records  # noqa: E402
from sparsediff.eval.video_io import Frames  # noqa: E402
from sparsediff.testing import tiny_vlm as tiny  # noqa: E402
from sparsediff.testing.tolerance import ROUNDING, tolerance  # noqa: E402

PIXELS = dict(min_pixels=28 * 28, max_pixels=56 * 84)


@pytest.fixture(scope="module")
def image_processor():
    return Qwen2VLImageProcessorPil(**PIXELS)


@pytest.fixture(scope="module")
def processor(image_processor):
    cls = qwen_video.image_only_processor_class(Qwen2_5_VLProcessor)
    return cls(image_processor=image_processor, video_processor=None, tokenizer=tiny.tiny_tokenizer(),
               chat_template=tiny.CHAT_TEMPLATE)


def _image(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.mark.parametrize("shape", [(56, 84), (28, 56), (28, 28)])
def test_two_copies_of_an_image_give_its_image_patches(image_processor, shape):
    # The image processor repeats an image temporal_patch_size times: a 2-frame still video is the same input.
    img = _image(*shape)
    ref = image_processor(img, return_tensors="pt")
    settings = qwen_video.VideoSettings.from_processor(image_processor)
    patches, grid = qwen_video.preprocess_video(np.stack([img, img]), settings)
    assert ref["image_grid_thw"].tolist() == [list(grid)]  # a list: no device to match
    assert patches.shape == ref["pixel_values"].shape
    # The same normalisation in another order: a few float32 roundings.
    torch.testing.assert_close(patches, ref["pixel_values"], **tolerance(torch.float32, ulps=ROUNDING))


def test_resized_frames_are_within_one_level_of_the_image_processor(image_processor):
    # PIL (image processor) and torch's uint8 bicubic kernel (torchvision's video path on CPU) may round apart.
    img = _image(50, 90, seed=1)
    ref = image_processor(img, return_tensors="pt")
    settings = qwen_video.VideoSettings.from_processor(image_processor)
    patches, grid = qwen_video.preprocess_video(np.stack([img, img]), settings)
    assert list(grid) == ref["image_grid_thw"][0].tolist() == [1, 4, 6]
    one_level = 1.01 / 255 / min(settings.image_std)
    assert (patches - ref["pixel_values"]).abs().max() <= one_level


def test_odd_frame_counts_repeat_the_last_frame(image_processor):
    settings = qwen_video.VideoSettings.from_processor(image_processor)
    a, b, c = _image(28, 56, 1), _image(28, 56, 2), _image(28, 56, 3)
    patches, grid = qwen_video.preprocess_video(np.stack([a, b, c]), settings)
    assert grid == (2, 2, 4)
    first, _ = qwen_video.preprocess_video(np.stack([a, b]), settings)
    last, _ = qwen_video.preprocess_video(np.stack([c, c]), settings)
    torch.testing.assert_close(patches, torch.cat([first, last]), rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"\(T, H, W, C\)"):
        qwen_video.preprocess_video(np.zeros((28, 28, 3), np.uint8), settings)


def test_text_and_images_match_the_processor(processor):
    texts = ["<|vision_start|><|image_pad|><|vision_end|>What is it?",
             "Two: <|vision_start|><|image_pad|><|vision_end|> and <|vision_start|><|image_pad|><|vision_end|>"]
    images = [_image(56, 84), _image(28, 28, 1), _image(40, 60, 2)]
    ref = processor(text=texts, images=images, padding=True, return_tensors="pt")
    ours = qwen_video.build_inputs(processor, texts, images)
    assert set(ours) == set(ref)
    for key in ref:
        assert torch.as_tensor(ours[key]).equal(torch.as_tensor(ref[key])), key


def test_video_placeholders_and_timing(processor):
    frames = [Frames(np.stack([_image(56, 84, i) for i in range(4)]), [0, 3, 6, 9], 4.0, 12),
              Frames(np.stack([_image(28, 28, i) for i in range(3)]), [0, 4, 8], 2.0, 12)]
    texts = ["<|vision_start|><|video_pad|><|vision_end|>a", "<|vision_start|><|video_pad|><|vision_end|>b"]
    inputs = qwen_video.build_inputs(processor, texts, videos=frames)
    assert inputs["video_grid_thw"].tolist() == [[2, 4, 6], [2, 2, 2]]
    assert inputs["pixel_values_videos"].shape == (48 + 8, 3 * 2 * 14 * 14)
    video_id = processor.tokenizer.convert_tokens_to_ids("<|video_pad|>")
    assert (inputs["input_ids"] == video_id).sum(1).tolist() == [48 // 4, 8 // 4]
    assert inputs["mm_token_type_ids"].eq(2).sum(1).tolist() == [12, 2]
    # Qwen2.5-VL: temporal_patch_size / sampled fps (4 of 12 frames at 4 fps -> 1/3 fps -> 6 s per patch).
    torch.testing.assert_close(inputs["second_per_grid_ts"], torch.tensor([2 / (4 / 12 * 4.0), 2 / (3 / 12 * 2.0)]))
    with pytest.raises(ValueError, match="fewer <\\|video_pad\\|>"):
        qwen_video.build_inputs(processor, texts[:1], videos=frames)


def test_settings_from_config_dicts():
    config = {"size": {"shortest_edge": 100, "longest_edge": 2000}, "patch_size": 16}
    s = qwen_video.VideoSettings.from_processor(config, {"max_pixels": 5000, "image_mean": 0.5})
    assert (s.min_pixels, s.max_pixels, s.patch_size, s.image_mean) == (100, 5000, 16, (0.5, 0.5, 0.5))


def test_videomme_with_tiny_qwen25_vl_without_video_processor(tmp_path, monkeypatch, caplog):
    # The stand-in videos are .mp4 files written (and read back) by imageio's FFMPEG plugin: imageio-ffmpeg.
    pytest.importorskip("imageio_ffmpeg", reason="writing the stand-in .mp4 videos needs imageio-ffmpeg")
    root = standins.write_videomme(tmp_path / "vmme", zipped=True)
    videos = []  # (patch rows, grid_thw) of every video the vision tower encoded
    build = tiny.tiny_qwen2_5_vl

    def counted(*args, **kwargs):
        model, processor = build(*args, **kwargs)
        processor.video_processor = None  # the torch-only path, with or without torchvision installed

        # generate() may encode pixel_values_videos before the first forward (mm_encoder_outputs), so the
        # vision tower is where the video is seen whatever the transformers version.
        def hook(module, args, kwargs):
            pixels, grid = args[0] if args else kwargs["hidden_states"], kwargs.get("grid_thw")
            videos.append((tuple(pixels.shape), grid.tolist()))

        model.model.visual.register_forward_pre_hook(hook, with_kwargs=True)
        return model, processor

    monkeypatch.setattr(tiny, "tiny_qwen2_5_vl", counted)
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING, logger="sparsediff.eval.qwen_video"):
        monkeypatch.setattr(qwen_video, "_warned", False)
        rc = main(["eval", "videomme", "--model", "tiny-qwen2.5-vl", "--data", str(root), "--methods",
                   "dense,ba_att:0.5", "--limit", "2", "--max-frames", "4", "--out", str(out), "--no-progress"])
    assert rc == 0
    for name in ("dense.jsonl", "ba_att-0.5.jsonl"):
        recs = read_records(out / name)
        assert [r["id"] for r in recs] == ["001-1", "001-2"]
        assert all(isinstance(r["prediction"], str) and r["latency_s"] > 0 for r in recs)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["methods"]["ba_att:0.5"]["n"] == 2 and summary["methods"]["dense"]["n"] == 2
    # One encoding per sample and method: 4 frames of 48x64 -> 56x56 -> grid (2, 4, 4), 32 patch rows.
    assert videos == [((32, 3 * 2 * 14 * 14), [[2, 4, 4]])] * 4
    assert sum("torch only" in r.getMessage() for r in caplog.records) == 1


def test_checkpoint_processor_loads_without_torchvision(tmp_path):
    pytest.importorskip("transformers.models.qwen2_5_vl")
    try:
        import torchvision  # noqa: F401

        pytest.skip("torchvision is installed: AutoProcessor loads the video processor itself")
    except ImportError:
        pass
    from sparsediff.eval.models import VLMRunner

    model, proc = tiny.tiny_qwen2_5_vl()
    proc.tokenizer.save_pretrained(tmp_path)
    proc.image_processor.save_pretrained(tmp_path)
    model.config.save_pretrained(tmp_path)
    (tmp_path / "processor_config.json").write_text(json.dumps({"processor_class": "Qwen2_5_VLProcessor"}))
    (tmp_path / "video_preprocessor_config.json").write_text(json.dumps(
        {"video_processor_type": "Qwen2VLVideoProcessor", "size": {"shortest_edge": 784, "longest_edge": 1568}}))
    runner = VLMRunner(str(tmp_path), model=model)
    assert runner.processor.video_processor is None and runner.processor.chat_template
    assert (runner.video_settings.min_pixels, runner.video_settings.max_pixels) == (784, 1568)
