"""Scorers on known answers: letter extraction, RealWorldQA exact match, RULER string match, summary
arithmetic, video metrics, and the crash-safe JSONL."""

import math

import numpy as np
import pytest
import torch

from sparsediff.eval import records, scoring
from sparsediff.eval.runner import parse_methods, parse_shard, select, summarize
from sparsediff.eval.video_fidelity import frame_scores, latent_differences
from sparsediff.testing.tolerance import ROUNDING, tolerance


@pytest.mark.parametrize("text, expected", [
    ("The answer is (B).", "B"),
    ("B", "B"),
    ("Answer: c", "C"),
    ("**D**", "D"),
    ("I do not know what is shown.", ""),
    ("", ""),
    ("(C)", "C"),
    ("b.", "B"),
    ("A. The man is running", "A"),
    ("A man is running, so the best answer is D.", "D"),
    ("The correct option is: (a)", "A"),
    ("The answer is a cat", ""),  # an article, not a choice
    ("E", ""),  # not one of A-D
])
def test_extract_choice(text, expected):
    assert scoring.extract_choice(text) == expected


def test_extract_choice_from_option_text():
    options = ["A. a red car", "B. a blue bicycle", "C. a green bus", "D. nothing"]
    assert scoring.extract_choice("it is a blue bicycle", options=options) == "B"
    assert scoring.score_choice("The best answer is: C", "C") == ("C", True)
    assert scoring.score_choice("The best answer is: C", "D") == ("C", False)


def test_realworldqa_exact_match():
    lettered = "Which side?\nA. left\nB. right\nC. middle\nPlease answer directly with only the letter."
    assert scoring.score_exact_match("B", "B", lettered) == ("B", True)
    assert scoring.score_exact_match("The answer is (c).", "C", lettered)[1]
    assert scoring.score_exact_match("right", "B", lettered) == ("B", True)  # option text maps to its letter
    assert not scoring.score_exact_match("A", "B", lettered)[1]
    open_q = "How many cones?\nPlease answer directly with a single word or number."
    assert scoring.score_exact_match("Four.", "4", open_q) == ("4", True)
    assert scoring.score_exact_match(" yes ", "Yes", open_q)[1]
    assert not scoring.score_exact_match("3", "4", open_q)[1]


def test_ruler_string_match():
    assert scoring.string_match_all("The numbers are 123 and 456.", ["123", "456"]) == 1.0
    assert scoring.string_match_all("only 123", ["123", "456"]) == 0.5
    assert scoring.string_match_all("nothing", ["123"]) == 0.0
    assert scoring.string_match_all("VAR abcde and FGHIJ", ["ABCDE", "FGHIJ"]) == 1.0  # case-insensitive
    assert scoring.string_match_part("only 456", ["123", "456"]) == 1.0


def test_accuracy_by_group():
    recs = [{"score": 1.0, "meta": {"duration": "short"}}, {"score": 0.0, "meta": {"duration": "short"}},
            {"score": 1.0, "meta": {"duration": "long"}}]
    assert scoring.accuracy(recs) == pytest.approx(200 / 3)
    assert scoring.accuracy_by(recs, "duration") == {"long": {"accuracy": 100.0, "n": 1},
                                                     "short": {"accuracy": 50.0, "n": 2}}


def test_summary_deltas_and_speedup_on_shared_samples():
    dense = [{"id": str(i), "score": 1.0, "latency_s": 2.0, "meta": {}} for i in range(4)]
    sparse = [{"id": str(i), "score": float(i != 0), "latency_s": 1.0, "meta": {}} for i in range(3)]
    rows = summarize({"dense": dense, "ba_att:0.5": sparse})
    r = rows["ba_att:0.5"]
    assert r["n"] == 3 and r["n_shared"] == 3
    assert r["accuracy"] == pytest.approx(200 / 3)
    assert r["delta_vs_dense"] == pytest.approx(200 / 3 - 100)
    assert r["speedup_vs_dense"] == pytest.approx(2.0)
    assert rows["dense"]["delta_vs_dense"] == 0.0


def test_method_and_shard_parsing():
    assert parse_methods("ba_att:0.5,dense,sparsed,ba_att:0.5") == ["dense", "ba_att:0.5", "sparsed"]
    assert parse_shard("1/4") == (1, 4) and parse_shard(None) == (0, 1)
    for bad in ("4/4", "a/b", "1"):
        with pytest.raises(ValueError, match="--shard"):
            parse_shard(bad)
    items = list(range(10))
    shards = [select(items, 7, (i, 3)) for i in range(3)]
    assert sorted(x for s in shards for x in s) == list(range(7))


def test_video_metrics_known_answers():
    a = np.full((3, 16, 16, 3), 100, np.uint8)
    psnr, ssim = frame_scores(a, a)
    assert all(math.isinf(v) for v in psnr) and ssim == pytest.approx([1.0] * 3)
    b = a.copy()
    b[1, ..., 0] += 10  # frame 1 only: MSE = (10/255)^2 / 3
    expected = 10 * math.log10(1.0 / ((10 / 255) ** 2 / 3))
    psnr, _ = frame_scores(b, a)
    rel = tolerance(torch.float32, ulps=ROUNDING)["rtol"]  # a float32 mean of squared differences: a few roundings
    assert math.isinf(psnr[0]) and psnr[1] == pytest.approx(expected, rel=rel)
    noisy = np.clip(a + np.random.default_rng(0).integers(-60, 60, a.shape), 0, 255).astype(np.uint8)
    assert max(frame_scores(noisy, a)[1]) < 0.9
    d = [torch.ones(4), torch.ones(4)]
    assert latent_differences(d, [torch.ones(4), torch.full((4,), 1.5)]) == pytest.approx([0.0, 0.5])


def test_records_resume_and_truncated_tail(tmp_path):
    path = tmp_path / "m.jsonl"
    with records.RecordWriter(path) as w:
        w.write({"id": "a", "x": 1})
        w.write({"id": "b", "x": 2})
        w.write({"id": "a", "x": 3})  # duplicate ids are never written
    with open(path, "a") as f:
        f.write('{"id": "c", "x"')  # a write cut short by a kill
    assert [r["id"] for r in records.read_records(path)] == ["a", "b"]
    with records.RecordWriter(path) as w:
        assert w.done == {"a", "b"}
        w.write({"id": "c", "x": 4})
    assert [r["id"] for r in records.read_records(path)] == ["a", "b", "c"]
    path.write_text('{"id": "a"}\nnot json\n{"id": "b"}\n')
    with pytest.raises(ValueError, match="m.jsonl: line 2"):
        records.read_records(path)
