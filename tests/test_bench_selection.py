"""The selection benchmark's CPU smoke run: every stage is timed and the threshold variants agree."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_quick_run_times_every_stage(tmp_path):
    out = tmp_path / "sel.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_selection.py"), "--quick", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())["results"]
    for row in rows:
        stages = row["stages"]
        for name in ("threshold (mass_threshold)", "threshold kthvalue", "plan ba_att", "plan ba_att_paper",
                     "compensate (pooled dropped blocks)"):
            assert stages[name]["ms"] > 0 and stages[name]["pct_of_dense"] > 0
        assert len(set(row["threshold_kept"].values())) == 1  # sort and kthvalue keep the same blocks
