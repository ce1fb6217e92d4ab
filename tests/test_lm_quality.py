"""``sparsediff eval lm-quality`` on the real SmolLM2 weights, small: routing went sparse in every layer, the
numbers are finite, keep-everything equals dense, resuming skips finished work, and the report is written."""

import json
import math

import pytest
import torch

from sparsediff.cli import main
from sparsediff.eval.lm_quality import LMQualityRun
from sparsediff.eval.lm_quality_report import oracle_of
from sparsediff.eval.records import read_records
from sparsediff.methods.base import method_at_density
from sparsediff.testing.tolerance import ROUNDING, tolerance

REPORTED = 0.5e-6  # records are rounded to 6 decimals
# Keep-everything against dense, per layer: a few float32 roundings, plus the records' rounding.
EXACT = tolerance(torch.float32, ulps=ROUNDING)["rtol"] + REPORTED


@pytest.fixture(scope="module")
def small_run(tmp_path_factory, real_lm):
    out = tmp_path_factory.mktemp("lmq")
    argv = ["eval", "lm-quality", "--tokens", "1024", "--settings", "oracle/allocation=global/local_window=none,ba_att",
            "--densities", "1.0,0.5", "--block-size", "64", "--layers", "0,5", "--needle-lengths", "600",
            "--needle-depths", "0.5", "--needle-settings", "ba_att", "--out", str(out), "--no-progress",
            "--device", "cpu"]
    assert main(argv) == 0
    return out, argv


def test_every_layer_ran_sparse_and_numbers_are_finite(small_run):
    out, _ = small_run
    ppl = {(r["setting"], r["target_density"]): r for r in read_records(out / "perplexity.jsonl")}
    dense = ppl[("dense", 1.0)]
    assert math.isfinite(dense["ppl"]) and 1 < dense["ppl"] < 100
    for setting in ("oracle/allocation=global/local_window=none", "ba_att"):
        for density in (1.0, 0.5):
            r = ppl[(setting, density)]
            assert r["sparse_layers"] == 30 and r["dense_layers"] == [], r
            assert r["routes"] == {"sparse": 30}
            assert math.isfinite(r["ppl"]) and math.isclose(r["realised_density"], density, abs_tol=0.02)
        # Keeping everything is dense attention: the same loss to float32 rounding (through 30 layers).
        assert math.isclose(ppl[(setting, 1.0)]["loss"], dense["loss"], rel_tol=tolerance(torch.float32)["rtol"],
                            abs_tol=REPORTED)
        assert ppl[(setting, 0.5)]["ppl"] >= dense["ppl"] * 0.98


def test_attention_records_against_dense_and_the_oracle(small_run):
    out, _ = small_run
    rows = read_records(out / "attention.jsonl")
    assert {r["layer"] for r in rows} == {0, 5} and len(rows) == 2 * 2 * 2
    for r in rows:
        assert len(r["error"]) == 9 and all(math.isfinite(x) for x in r["error"] + r["recall"] + r["density"])
        if r["target_density"] == 1.0:
            assert max(r["error"]) < EXACT and min(r["recall"]) > 1 - EXACT
        else:
            assert 0 < min(r["recall"]) <= max(r["recall"]) <= 1.0
    summary = json.loads((out / "summary.json").read_text())
    half = {r["setting"]: r for r in summary["rows"] if r["target_density"] == 0.5}
    assert half["ba_att"]["oracle"] == "oracle/allocation=global/local_window=none"
    assert 0.9 < half["ba_att"]["error_over_oracle"] < 1.5
    assert (out / "attention_error.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "perplexity_vs_density.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| `ba_att` | 0.5 |" in (out / "summary.md").read_text()


def test_needles_and_resume(small_run, capsys):
    out, argv = small_run
    needles = read_records(out / "needles.jsonl")
    assert {r["setting"] for r in needles} == {"dense", "ba_att"}
    for r in needles:
        assert r["prompt_tokens"] <= 600 and math.isfinite(r["answer_logprob"]) and r["answer"].isdigit()
    before = {p.name: p.read_text() for p in out.glob("*.jsonl")}
    assert main(argv) == 0  # everything done: nothing is recomputed or appended
    assert {p.name: p.read_text() for p in out.glob("*.jsonl")} == before
    assert "Needles" in capsys.readouterr().out


def test_bad_settings_fail_before_loading_anything(tmp_path, capsys):
    assert main(["eval", "lm-quality", "--settings", "nosuch", "--out", str(tmp_path)]) == 2
    assert "unknown method 'nosuch'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["eval", "lm-quality", "--densities", "1.5", "--out", str(tmp_path)])
    with pytest.raises(ValueError, match="parts"):
        LMQualityRun(out=str(tmp_path), parts=("speed",))


def test_oracle_is_matched_by_budget_policy():
    settings = ["oracle", "xattention", "oracle/allocation=global/local_window=none", "ba_att", "ba_att_paper"]
    got = oracle_of(settings, None)
    assert got["xattention"] == "oracle" and got["ba_att_paper"] == "oracle"
    assert got["ba_att"] == "oracle/allocation=global/local_window=none"
    assert method_at_density("ba_att:0.8", 0.5, 64).config.sparsity == 0.8  # the spec's own sparsity wins
