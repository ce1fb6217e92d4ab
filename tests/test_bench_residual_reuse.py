"""The residual-reuse benchmark's CPU smoke run: its report has every row, schedule and timing it prints."""

import json
import subprocess
import sys
from pathlib import Path

import torch

from sparsediff.testing.tolerance import ROUNDING, tolerance

ROOT = Path(__file__).resolve().parents[1]
EXACT = tolerance(torch.float32, ulps=ROUNDING)["rtol"]  # relative L2 of a float32 recompute: a few roundings


def test_quick_run(tmp_path):
    out = tmp_path / "rr.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_residual_reuse.py"), "--quick", "--out", str(out),
           "--methods", "xattention", "--time-reps", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    rows = report["main"]["rows"]
    assert [(r["sparsity"], r["every"]) for r in rows] == [(0.5, 0), (0.5, 2), (0.8, 0), (0.8, 2)]
    assert all(len(r["errors"]) == 6 for r in rows)
    reused = [r for r in rows if r["every"]]
    assert all(r["errors"][0] < EXACT and r["refresh_steps"] == [0, 2, 4] and r["residual_bytes"] > 0 for r in reused)
    assert all(r["mean"] < p["mean"] for r, p in zip(reused, [rows[0], rows[2]]))
    assert set(report["step_ms"]) == {"xattention:0.5", "xattention:0.8"}
    assert set(report["step_ms"]["xattention:0.8"]) == {"plain", "refresh", "reuse", "dense_sdpa"}
    assert report["target"] == {"xattention": None}  # no r=5 in the quick run


def test_quick_run_with_kept_plans(tmp_path):
    out = tmp_path / "plan.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_residual_reuse.py"), "--quick", "--out", str(out),
           "--methods", "ba_att", "--every", "", "--plan-every", "2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())["main"]["rows"]
    assert [(r["sparsity"], r["every"], r.get("reuse")) for r in rows] == [
        (0.5, 0, None), (0.5, 2, "plan"), (0.8, 0, None), (0.8, 2, "plan")]
    for plain, kept in ((rows[0], rows[1]), (rows[2], rows[3])):
        assert kept["refresh_steps"] == [0, 2, 4] and kept["plan_bytes"] > 0
        # refresh steps select afresh: the same output as plain sparse attention there
        assert all(abs(kept["errors"][t] - plain["errors"][t]) < 1e-6 for t in kept["refresh_steps"])
    assert "plan kept 2" in proc.stdout
