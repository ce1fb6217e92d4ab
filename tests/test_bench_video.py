"""The Wan step benchmark's CPU smoke run: every layout row, the residual-reuse row and the layout's cost."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_quick_run_times_layouts_and_residual_reuse(tmp_path):
    pytest.importorskip("diffusers")
    out = tmp_path / "video.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_video.py"), "--quick", "--sparsity", "0.5", "--warmup",
           "0", "--repeat", "1", "--residual-every", "2", "--plan-every", "2", "--cycles", "1", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    rows = {(r["method"], r.get("layout")): r for r in result["rows"]}
    assert {("ba_att", "rowmajor"), ("ba_att", "tiled"), ("ba_att+residual/2", "tiled"),
            ("ba_att+plan/2", "tiled")} <= set(rows)
    for row in result["rows"]:
        assert row["step_s"] > 0 and row["step_speedup"] > 0
    for row in result["rows"][1:]:  # every sparse row says what ran: all routed self-attention calls sparse here
        assert row["sparse_share"] == 1.0 and row["routes"].get("sparse", 0) > 0
        assert row["kept_density"] is not None and 0 < row["kept_density"] <= 1
    residual = rows[("ba_att+residual/2", "tiled")]
    # 4 steps (one untimed cycle + one timed): 2 refresh and 2 reuse steps per self-attention layer.
    assert residual["residual_refreshes"] > 0 and residual["residual_reuses"] == residual["residual_refreshes"]
    assert residual["residual_mib"] > 0
    kept = rows[("ba_att+plan/2", "tiled")]
    assert kept["plan_refreshes"] > 0 and kept["plan_reuses"] == kept["plan_refreshes"] and kept["plan_mib"] > 0
    assert result["layout_cost"]["layout_ms_per_step"] > 0


def test_kept_plans_are_timed_for_every_method_spec(tmp_path):
    pytest.importorskip("diffusers")
    out = tmp_path / "video.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_video.py"), "--quick", "--sparsity", "0.5", "--warmup",
           "0", "--repeat", "1", "--layout", "tiled", "--method", "ba_att", "ba_att_paper", "--plan-every", "2",
           "--cycles", "1", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    kept = {r["method"]: r for r in json.loads(out.read_text())["rows"] if "+plan/" in r["method"]}
    assert set(kept) == {"ba_att+plan/2", "ba_att_paper+plan/2"}
    for row in kept.values():
        assert row["plan_refreshes"] > 0 and row["plan_reuses"] == row["plan_refreshes"] and row["step_s"] > 0


def test_profile_quick_run_reports_every_layout(tmp_path):
    pytest.importorskip("diffusers")
    out = tmp_path / "profile.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "profile_video_step.py"), "--quick", "--repeat", "1", "--top", "3",
           "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = json.loads(out.read_text())["runs"]
    assert [(r["method"], r["layout"]) for r in runs] == [("dense", "-"), ("ba_att", "rowmajor"), ("ba_att", "tiled")]
    for run in runs:
        assert run["step_s"] > 0 and run["enqueue_s"] > 0 and run["kernel_s"] > 0
        assert 0 < len(run["top"]) <= 3 and all(row["ms"] > 0 and row["calls"] > 0 for row in run["top"])
    for run in runs[1:]:  # the sparse rows say what ran sparse
        assert run["sparse_share"] == 1.0 and run["routes"]["sparse"] > 0
