"""The quality-versus-selection-time plot: joins lm-quality perplexities with bench_selection plan times."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import plot_selection_pareto as pareto  # noqa: E402


def _write(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")


def test_points_join_quality_and_plan_time(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    _write(a, [{"setting": "dense", "ppl": 10.0}, {"setting": "ba_att", "target_density": 0.5, "ppl": 10.1}])
    _write(b, [{"setting": "dense", "ppl": 10.0}, {"setting": "oracle", "target_density": 0.5, "ppl": 10.0}])
    sel = tmp_path / "sel.json"
    stages = {"plan ba_att": {"ms": 1.0, "pct_of_dense": 5.5}, "sampled_mass rows4": {"ms": 0.5, "pct_of_dense": 3}}
    sel.write_text(json.dumps({"results": [{"n": 32768, "stages": stages}]}))
    dense, ppl = pareto.load_quality([a, b])
    rows = pareto.points(dense, ppl, pareto.load_plan_pct(sel, 32768))
    assert rows[0][:3] == ("ba_att", 0.5, 5.5) and rows[0][3] == pytest.approx(1.0)
    assert rows[1][:3] == ("oracle", 0.5, None) and rows[1][3] == pytest.approx(0.0)  # not timed: reference line
    out = tmp_path / "p.png"
    assert pareto.main(["--quality", str(a), str(b), "--selection", str(sel), "--out", str(out)]) == 0
    assert out.stat().st_size > 0


def test_quality_files_of_different_texts_are_refused(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    _write(a, [{"setting": "dense", "ppl": 10.0}])
    _write(b, [{"setting": "dense", "ppl": 12.0}])
    with pytest.raises(ValueError, match="another text"):
        pareto.load_quality([a, b])
