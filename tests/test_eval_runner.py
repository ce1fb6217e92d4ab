"""The ``sparsediff eval`` runner end to end on stand-in data: files, summaries, resume after a crash
or a kill, shards, tiny real models (causal LM, VLM, video pipeline) and clear errors."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from sparsediff.cli import main
from sparsediff.eval import standins
from sparsediff.eval.models import FakeRunner
from sparsediff.eval.records import read_records
from sparsediff.eval.ruler import Ruler, generate_ruler
from sparsediff.eval.runner import run_benchmark
from sparsediff.eval.video_io import ffmpeg_available


def _has(module):
    try:
        __import__(module)
        return True
    except Exception:
        return False


@pytest.fixture(scope="module")
def videomme_root(tmp_path_factory):
    pytest.importorskip("imageio_ffmpeg", reason="writing the stand-in .mp4 videos needs imageio-ffmpeg")
    return standins.write_videomme(tmp_path_factory.mktemp("vmme"), zipped=True)


def _ids(path):
    return [r["id"] for r in read_records(path)]


def test_videomme_cli_with_fake_model(videomme_root, tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["eval", "videomme", "--model", "fake", "--data", str(videomme_root), "--methods", "dense,ba_att:0.5",
               "--max-frames", "4", "--out", str(out), "--no-progress"])
    assert rc == 0
    assert "| ba_att:0.5 | 4 |" in capsys.readouterr().out
    dense, sparse = read_records(out / "dense.jsonl"), read_records(out / "ba_att-0.5.jsonl")
    assert [r["id"] for r in dense] == ["001-1", "001-2", "301-1", "601-1"]
    assert all(r["correct"] and r["parsed"] == r["answer"] for r in dense)
    assert set(dense[0]) >= {"id", "method", "prediction", "correct", "latency_s", "meta"}
    # FakeRunner answers wrong under sparse methods where sum(ord(id)) % 4 == 0.
    wrong = {r["id"] for r in sparse if sum(map(ord, r["id"])) % 4 == 0}
    assert {r["id"] for r in sparse if not r["correct"]} == wrong
    summary = json.loads((out / "summary.json").read_text())
    expected = 100.0 * (4 - len(wrong)) / 4
    assert summary["methods"]["ba_att:0.5"]["accuracy"] == pytest.approx(expected)
    assert summary["methods"]["ba_att:0.5"]["delta_vs_dense"] == pytest.approx(expected - 100.0)
    assert set(summary["methods"]["dense"]["groups"]["duration"]) == {"short", "medium", "long"}
    md = (out / "summary.md").read_text()
    assert "### accuracy (%) by duration" in md and md.index("| short |") < md.index("| long |")


def test_resume_after_an_exception_keeps_every_id_once(videomme_root, tmp_path):
    records = generate_ruler(["niah_single", "vt"], (256,), 5)
    bench = Ruler(records)
    crashing = FakeRunner(fail_after=7)
    with pytest.raises(RuntimeError, match="injected failure"):
        run_benchmark(bench, crashing, "dense,sparsed", tmp_path, progress=False)
    before = {m: _ids(tmp_path / f"{m}.jsonl") for m in ("dense", "sparsed")}
    assert sum(map(len, before.values())) == 7
    resumed = FakeRunner()
    summary = run_benchmark(bench, resumed, "dense,sparsed", tmp_path, progress=False)
    assert len(resumed.calls) == 20 - 7  # nothing finished was redone
    assert not set(resumed.calls) & {(m, i) for m, ids in before.items() for i in ids}
    for m in ("dense", "sparsed"):
        ids = _ids(tmp_path / f"{m}.jsonl")
        assert sorted(ids) == sorted(r["id"] for r in records) and len(set(ids)) == len(ids)
    assert summary["methods"]["dense"]["n"] == 10


def test_resume_after_kill(tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "sparsediff.cli", "eval", "ruler", "--model", "fake", "--lengths", "256",
           "--num-samples", "4", "--tasks", "niah_single,niah_multivalue,vt", "--methods", "dense,ba_att:0.5",
           "--out", str(out), "--no-progress"]
    proc = subprocess.Popen(cmd + ["--fake-delay", "0.05"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while time.time() < deadline:
        if (out / "dense.jsonl").exists() and len(_ids(out / "dense.jsonl")) >= 5:
            break
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = len(_ids(out / "dense.jsonl"))
    assert 5 <= killed_at < 12
    with open(out / "dense.jsonl", "a") as f:
        f.write('{"id": "vt-256-3", "meth')  # a line cut short by the kill
    assert subprocess.run(cmd, capture_output=True).returncode == 0
    for name in ("dense.jsonl", "ba_att-0.5.jsonl"):
        ids = _ids(out / name)
        assert len(ids) == 12 and len(set(ids)) == 12
    assert json.loads((out / "summary.json").read_text())["methods"]["dense"]["accuracy"] == 100.0


def test_shards_merge_into_the_unsharded_result(tmp_path):
    common = ["eval", "ruler", "--model", "fake", "--lengths", "256", "--num-samples", "3", "--tasks",
              "niah_single,vt", "--methods", "ba_att:0.5", "--limit", "5", "--no-progress"]
    assert main(common + ["--out", str(tmp_path / "whole")]) == 0
    for i in range(2):
        assert main(common + ["--out", str(tmp_path / "sharded"), "--shard", f"{i}/2"]) == 0
    assert sorted(p.name for p in (tmp_path / "sharded").glob("dense*.jsonl")) == \
        ["dense.shard-0-of-2.jsonl", "dense.shard-1-of-2.jsonl"]
    whole = json.loads((tmp_path / "whole" / "summary.json").read_text())["methods"]
    sharded = json.loads((tmp_path / "sharded" / "summary.json").read_text())["methods"]
    for m in ("dense", "ba_att:0.5"):
        assert sharded[m]["n"] == whole[m]["n"] == 5
        assert sharded[m]["accuracy"] == whole[m]["accuracy"]
    assert main(["eval", "report", "--out", str(tmp_path / "sharded")]) == 0


@pytest.mark.skipif(not _has("sparsediff.hooks"), reason="transformers hooks not installed")
def test_ruler_with_tiny_causal_lm_and_real_hooks(tmp_path):
    out = tmp_path / "out"
    rc = main(["eval", "ruler", "--model", "tiny-qwen2", "--lengths", "1024", "--num-samples", "1", "--tasks",
               "niah_single,niah_multivalue,vt", "--methods", "dense,ba_att:0.5", "--batch-size", "2",
               "--out", str(out), "--no-progress"])
    assert rc == 0
    data = read_records(out / "ruler_data.jsonl")
    assert all(r["tokens"] <= 1024 for r in data)
    for name in ("dense.jsonl", "ba_att-0.5.jsonl"):
        recs = read_records(out / name)
        assert len(recs) == 3 and all(isinstance(r["prediction"], str) and 0.0 <= r["score"] <= 1.0 for r in recs)
    assert json.loads((out / "summary.json").read_text())["methods"]["ba_att:0.5"]["n_shared"] == 3


def test_realworldqa_with_tiny_vlm(tmp_path):
    data = standins.write_realworldqa(tmp_path / "rw", n=3)
    out = tmp_path / "out"
    rc = main(["eval", "realworldqa", "--model", "tiny-qwen2-vl", "--data", str(data), "--methods", "dense",
               "--batch-size", "2", "--out", str(out), "--no-progress"])
    assert rc == 0
    recs = read_records(out / "dense.jsonl")
    assert [r["id"] for r in recs] == ["rwqa-0000", "rwqa-0001", "rwqa-0002"]
    assert all(isinstance(r["prediction"], str) and r["latency_s"] > 0 for r in recs)


@pytest.mark.skipif(not _has("sparsediff.attention_processors"), reason="diffusers processors not installed")
def test_video_fidelity_with_tiny_wan(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# comment\na red fox running in snow\n\nwaves at sunset\n")
    out = tmp_path / "out"
    args = ["eval", "video-fidelity", "--model", "tiny-wan", "--prompts", str(prompts), "--methods",
            "dense,ba_att:0.5", "--num-frames", "5", "--height", "32", "--width", "32", "--steps", "3",
            "--guidance-scale", "1.0", "--dtype", "fp32", "--out", str(out), "--no-progress"]
    assert main(args) == 0
    dense, sparse = read_records(out / "dense.jsonl"), read_records(out / "ba_att-0.5.jsonl")
    assert [r["id"] for r in dense] == ["p000-a-red-fox-running", "p001-waves-at-sunset"]
    assert dense[0]["psnr"] is None and "identical" in dense[0]["psnr_note"]  # strict JSON: no Infinity
    assert dense[0]["ssim"] == pytest.approx(1.0)
    assert dense[0]["latent_rel_l2_per_step"] == [0.0, 0.0, 0.0]
    for r in sparse:
        assert len(r["psnr_per_frame"]) == r["frames"] == 5 and len(r["latent_rel_l2_per_step"]) == 3
        assert r["latent_rel_l2_final"] >= 0.0 and -1.0 <= r["ssim"] <= 1.0
    # .mp4 with imageio-ffmpeg, a .gif of the same name without it (video_io.write_video)
    suffix = ".mp4" if ffmpeg_available() else ".gif"
    assert (out / "videos" / "dense" / f"p000-a-red-fox-running{suffix}").is_file()
    assert "| ba_att:0.5 | 2 |" in (out / "summary.md").read_text()
    # Routes per record: the tiny clip is short, so which calls ran sparse is recorded, not assumed.
    assert all(set(r["routes"]) <= {"sparse", "dense_short", "dense_cross", "dense_step"} for r in sparse)
    assert all(r["sparse_share"] is None or 0.0 <= r["sparse_share"] <= 1.0 for r in sparse)
    assert main(args) == 0  # resumed: nothing redone, nothing duplicated
    assert len(read_records(out / "ba_att-0.5.jsonl")) == 2


@pytest.mark.skipif(not _has("sparsediff.commands.probe"), reason="attention fidelity not installed")
def test_attention_fidelity_delegates(tmp_path):
    rc = main(["eval", "attention", "--generators", "random", "--methods", "ba_att", "--densities", "0.5",
               "--n", "256", "--heads", "1", "--dim", "16", "--block-size", "64", "--no-plots", "--out", str(tmp_path)])
    assert rc == 0 and json.loads((tmp_path / "results.json").read_text())["rows"]


def test_clear_errors(tmp_path, capsys):
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"nope")
    assert main(["eval", "realworldqa", "--model", "fake", "--data", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert f"{bad}: not a readable parquet file" in capsys.readouterr().err
    assert main(["eval", "ruler", "--model", "tiny-qwen2", "--methods", "no_such_method",
                 "--out", str(tmp_path / "o")]) == 2
    assert "unknown method 'no_such_method'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["eval", "nonsense"])


def test_summary_says_what_ran_sparse_and_flags_methods_that_never_did(tmp_path):
    """Routes recorded per batch add up per method; a method whose calls all ran dense gets its speed-up in
    brackets and a sentence saying why, instead of a plain speed-up."""
    from sparsediff.eval.records import RecordWriter
    from sparsediff.eval.runner import results_path, write_summary

    def write(method, routes, latency):
        with RecordWriter(results_path(tmp_path, method)) as w:
            for i in range(2):
                w.write({"id": str(i), "method": method, "prediction": "x", "parsed": "x", "answer": "x",
                         "score": 1.0, "correct": True, "latency_s": latency, "routes": routes if i == 0 else {},
                         "meta": {}})

    write("dense", {}, 1.0)
    write("ba_att:0.5", {"sparse": 30, "dense_decode": 90}, 0.5)
    write("sparsed:0.5", {"dense_no_steps": 30, "dense_decode": 90}, 0.9)
    summary = write_summary(tmp_path, "ruler")
    assert summary["methods"]["ba_att:0.5"]["sparse_share"] == 0.25
    assert summary["methods"]["sparsed:0.5"]["sparse_share"] == 0.0
    md = (tmp_path / "summary.md").read_text()
    assert "| 30/120 (dense: decode 90) |" in md
    assert "(1.11×)" in md and "No attention call ran sparse for sparsed:0.5" in md


def test_video_fidelity_tiny_defaults_run_without_sizes(tmp_path):
    """`eval video-fidelity --model tiny-wan` with no sizes uses the tiny size (it used to crash on 480x832),
    warms up before timing, and writes strict JSON."""
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red fox\n")
    out = tmp_path / "vf"
    assert main(["eval", "video-fidelity", "--model", "tiny-wan", "--methods", "ba_att:0.5", "--prompts", str(prompts),
                 "--steps", "2", "--out", str(out), "--no-progress", "--no-videos"]) == 0
    sparse = read_records(out / "ba_att-0.5.jsonl")[0]
    assert sparse["frames"] == 17 and sparse["size"] == [128, 128]
    assert sparse["routes"]["sparse"] > 0 and sparse["sparse_share"] == 1.0  # every self-attention call sparse
    assert "| 100 % |" in (out / "summary.md").read_text()
    assert 0 < sparse["psnr"] < 200  # the tiny size is long enough for the budget to change the video
    for path in out.glob("*.json*"):
        assert "Infinity" not in path.read_text()


def test_video_fidelity_summary_flags_methods_that_never_ran_sparse(tmp_path):
    from sparsediff.eval.records import RecordWriter
    from sparsediff.eval.runner import results_path
    from sparsediff.eval.video_fidelity import write_fidelity_summary

    def write(method, routes, share, latency):
        with RecordWriter(results_path(tmp_path, method)) as w:
            w.write({"id": "p0", "method": method, "psnr": 40.0, "ssim": 0.99, "lpips": None,
                     "latent_rel_l2_final": 0.01, "latency_s": latency, "dense_latency_s": 1.0,
                     "routes": routes, "sparse_share": share})

    write("dense", {}, None, 1.0)
    write("ba_att:0.5", {"sparse": 12, "dense_cross": 12}, 1.0, 0.5)
    write("sparsed:0.5", {"dense_step": 12, "dense_cross": 12}, 0.0, 0.8)
    summary = write_fidelity_summary(tmp_path, ["dense", "ba_att:0.5", "sparsed:0.5"])
    assert summary["methods"]["ba_att:0.5"]["sparse_share"] == 1.0
    md = (tmp_path / "summary.md").read_text()
    assert "| 2.00× | 100 % |" in md and "| (1.25×) | 0 % |" in md
    assert "No attention call ran sparse for sparsed:0.5" in md
