"""Loaders on stand-in files in the published formats: Video-MME (parquet + zip chunks + subtitles),
RealWorldQA (parquet with PNG image structs), offline RULER; malformed files give errors naming them."""

import json
import warnings
import zipfile

import numpy as np
import pandas as pd
import pytest

from sparsediff.eval import ruler, standins, video_io
from sparsediff.eval.realworldqa import RealWorldQA
from sparsediff.eval.videomme import VideoMME, build_prompt, parse_srt, subtitles_at


def needs_video_writer():
    # The stand-in videos are .mp4 files written by imageio's FFMPEG plugin, which imageio-ffmpeg provides.
    pytest.importorskip("imageio_ffmpeg", reason="writing the stand-in .mp4 videos needs imageio-ffmpeg")


@pytest.fixture(scope="module")
def videomme_zipped(tmp_path_factory):
    needs_video_writer()
    return standins.write_videomme(tmp_path_factory.mktemp("vmme"), zipped=True)


def test_videomme_prompt_and_samples(videomme_zipped):
    bench = VideoMME(str(videomme_zipped), max_frames=4)
    samples = bench.samples()
    assert [s.id for s in samples] == ["001-1", "001-2", "301-1", "601-1"]
    s = samples[0]
    assert s.answer == "B" and s.meta["duration"] == "short" and s.meta["task_type"] == "Counting Problem"
    lines = s.prompt.split("\n")
    assert lines[0].startswith("Select the best answer to the following multiple-choice question")
    assert lines[2:6] == [f"{x}. option {x.lower()} for 001-1" for x in "ABCD"]
    assert lines[-1] == "The best answer is:"
    assert bench.score(s, "The answer is (B).") == ("B", True)
    assert bench.score(s, "no idea") == ("", False)


def test_videomme_videos_from_zip_chunks(videomme_zipped, tmp_path):
    bench = VideoMME(str(videomme_zipped), max_frames=4, max_pixels=32 * 24, extract_dir=tmp_path / "x")
    prepared = bench.prepare(bench.samples()[2])  # its video is in the second chunk
    frames = prepared.video
    assert frames.array.shape == (4, 24, 32, 3) and frames.array.dtype == np.uint8
    assert frames.total_frames == 12 and frames.source_fps == pytest.approx(4.0)
    assert frames.indices == [1, 4, 7, 10]
    assert (tmp_path / "x" / "vidB0000002.mp4").is_file()
    assert prepared.video.metadata()["frames_indices"] == [1, 4, 7, 10]


def test_videomme_subtitles_and_loose_layout(tmp_path):
    needs_video_writer()
    root = standins.write_videomme(tmp_path, zipped=True, loose=True)
    bench = VideoMME(str(root / "videomme" / "test-00000-of-00001.parquet"), num_frames=6, max_frames=None,
                     subtitles=True)
    text = bench.prepare(bench.samples()[0]).text
    assert text.startswith("This video's subtitles are listed below: \nhello there\ngeneral kenobi\n")
    no_subs = bench.prepare(bench.samples()[2]).text
    assert "No subtitles available" in no_subs
    cues = parse_srt("1\n00:00:01,000 --> 00:00:02,500\n<i>hi</i>\n\n2\n00:00:03,000 --> 00:00:04,000\nbye\n")
    assert cues == [(1.0, 2.5, "hi"), (3.0, 4.0, "bye")]
    assert subtitles_at(cues, [0.5, 1.2, 3.5]) == "hi\nbye"
    with_subs = build_prompt("Q?", ["A. x"], subtitles="")
    assert with_subs.startswith("This video's subtitles are listed below: \nNo subtitles")


def test_frame_sampling_and_imageio_fallback(videomme_zipped, tmp_path):
    assert video_io.sample_indices(100, 10.0, num_frames=4) == [12, 37, 62, 87]
    assert video_io.sample_indices(100, 10.0, fps=0.2) == [25, 75]  # 10 s of video at 0.2 fps
    assert video_io.sample_indices(100, 10.0, fps=2, max_frames=5) == [10, 30, 50, 70, 90]
    assert video_io.sample_indices(3, 1.0, num_frames=8) == [0, 1, 2]
    bench = VideoMME(str(videomme_zipped), extract_dir=tmp_path)
    path = bench.store.find("vidA0000001")
    a = video_io.read_video(path, num_frames=3, backend="decord")
    b = video_io.read_video(path, num_frames=3, backend="imageio")
    assert a.indices == b.indices and np.abs(a.array.astype(int) - b.array.astype(int)).mean() < 3
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"not a video")
    with warnings.catch_warnings(), pytest.raises(ValueError, match="bad.mp4"):
        warnings.simplefilter("ignore")
        video_io.read_video(bad, num_frames=2)


def test_videomme_malformed_files(tmp_path):
    (tmp_path / "videomme").mkdir()
    bad = tmp_path / "videomme" / "test-00000-of-00001.parquet"
    bad.write_bytes(b"PAR1 definitely not parquet")
    with pytest.raises(ValueError, match="test-00000-of-00001.parquet: not a readable parquet"):
        VideoMME(str(tmp_path)).samples()
    pd.DataFrame({"question_id": ["1"], "question": ["q"]}).to_parquet(bad)
    with pytest.raises(ValueError, match=r"test-00000-of-00001.parquet: missing column\(s\) \['video_id'"):
        VideoMME(str(tmp_path)).samples()
    with pytest.raises(ValueError, match="no Video-MME parquet"):
        VideoMME(str(_empty(tmp_path)))
    needs_video_writer()
    root = standins.write_videomme(tmp_path / "ok", zipped=False)
    bench = VideoMME(str(root))
    with pytest.raises(FileNotFoundError, match="vidA0000001.mp4"):
        bench.prepare(bench.samples()[0])
    (root / "videos_chunked_01.zip").write_bytes(b"broken")
    bench = VideoMME(str(root))
    with pytest.raises(ValueError, match="videos_chunked_01.zip: not a readable zip"):
        bench.prepare(bench.samples()[0])


def _empty(tmp_path):
    d = tmp_path / "empty"
    d.mkdir()
    return d


def test_realworldqa_loader(tmp_path):
    root = standins.write_realworldqa(tmp_path, n=4)
    bench = RealWorldQA(str(root))
    samples = bench.samples()
    assert [s.id for s in samples] == ["rwqa-0000", "rwqa-0001", "rwqa-0002", "rwqa-0003"]
    assert samples[0].answer == "A" and samples[0].meta["kind"] == "choice"
    assert samples[1].answer == "2" and samples[1].meta["kind"] == "open"
    image = bench.prepare(samples[1]).images[0]
    assert image.size == (56, 48) and image.mode == "RGB"
    assert bench.score(samples[0], "A")[1] and bench.score(samples[1], "two")[1]
    small = RealWorldQA(str(root / "data" / "test-00000-of-00001.parquet"), max_pixels=20 * 20)
    assert small.prepare(samples[3]).images[0].width * small.prepare(samples[3]).images[0].height <= 400


def test_realworldqa_malformed(tmp_path):
    path = tmp_path / "rw.parquet"
    pd.DataFrame({"question": ["q"], "answer": ["A"]}).to_parquet(path)
    with pytest.raises(ValueError, match=r"rw.parquet: missing column\(s\) \['image'\]"):
        RealWorldQA(str(path)).samples()
    pd.DataFrame({"image": [{"bytes": b"junk", "path": "x.png"}], "question": ["q"], "answer": ["A"]}).to_parquet(path)
    bench = RealWorldQA(str(path))
    with pytest.raises(ValueError, match=r"rw.parquet:0 \(rwqa-0000\): the image cannot be decoded"):
        bench.prepare(bench.samples()[0])


def test_ruler_generation_is_seeded_and_fits():
    from sparsediff.testing.tiny_vlm import tiny_tokenizer

    count = ruler.tokenizer_counter(tiny_tokenizer())
    recs = ruler.generate_ruler(lengths=(1024, 2048), num_samples=2, seed=3, count=count)
    assert len(recs) == len(ruler.TASKS) * 2 * 2
    again = ruler.generate_ruler(tasks=["vt"], lengths=(2048,), num_samples=2, seed=3, count=count)
    assert [r["input"] for r in again] == [r["input"] for r in recs if r["task"] == "vt" and r["length"] == 2048]
    for r in recs:
        assert r["tokens"] == count(r["input"] + r["answer_prefix"]) + ruler.TOKENS_TO_GENERATE
        assert 0.85 * r["length"] < r["tokens"] <= r["length"], r["id"]
        assert all(v in r["input"] for v in r["outputs"])  # every expected answer is in the haystack
        # The noise haystack, except where the haystack is made of distractor needles.
        assert (ruler.NOISE in r["input"]) == (r["task"] != "niah_multikey_needle")
    by_task = {r["task"]: r for r in recs}
    assert len(by_task["niah_multivalue"]["outputs"]) == 4 and len(by_task["niah_multiquery"]["outputs"]) == 4
    assert len(by_task["vt"]["outputs"]) == 5
    assert by_task["niah_single"]["input"].startswith("A special magic number is hidden")
    assert ruler.generate_ruler(["niah_single"], (1024,), 1, seed=4, count=count)[0]["input"] != \
        ruler.generate_ruler(["niah_single"], (1024,), 1, seed=3, count=count)[0]["input"]


def test_ruler_jsonl_round_trip_and_errors(tmp_path):
    recs = ruler.generate_ruler(["niah_single"], (512,), 2)
    ruler.save_jsonl(recs, tmp_path / "r.jsonl")
    assert ruler.load_ruler_jsonl(tmp_path / "r.jsonl") == recs
    # RULER's own validation.jsonl: index, input, outputs, length.
    (tmp_path / "niah_single_1").mkdir()
    own = tmp_path / "niah_single_1" / "validation.jsonl"
    own.write_text(json.dumps({"index": 0, "input": "x", "outputs": ["1"], "length": 4096}) + "\n")
    assert ruler.load_ruler_jsonl(own)[0]["id"] == "niah_single_1-4096-0"
    own.write_text(json.dumps({"index": 0, "input": "x"}) + "\n")
    with pytest.raises(ValueError, match=r"validation.jsonl: line 1 lacks field\(s\) \['outputs'\]"):
        ruler.load_ruler_jsonl(own)
    with pytest.raises(ValueError, match="unknown RULER task"):
        ruler.generate_ruler(["nope"], (512,), 1)


def test_zip_members_are_real_chunks(videomme_zipped):
    with zipfile.ZipFile(videomme_zipped / "videos_chunked_01.zip") as zf:
        assert zf.namelist() == ["data/vidA0000001.mp4", "data/vidB0000002.mp4"]
