"""The 8-bit benchmark's CPU smoke run: every precision timed, errors within the 8-bit formats' bounds."""

import json
import subprocess
import sys
from pathlib import Path

import numpy
import pytest

ROOT = Path(__file__).resolve().parents[1]


# The quick run is the Triton interpreter on CPU, which breaks on numpy >= 2.4 (pyproject pins it out; a GPU image
# may bring its own numpy).
@pytest.mark.skipif(tuple(int(x) for x in numpy.__version__.split(".")[:2]) >= (2, 4),
                    reason="the Triton 3.6 interpreter breaks on numpy >= 2.4 (pinned out in pyproject.toml)")
def test_quick_run_times_every_precision(tmp_path):
    out = tmp_path / "e8.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_eight_bit.py"), "--quick", "--densities", "0.5",
           "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (row,) = json.loads(out.read_text())["rows"]
    kernels = row["kernels"]
    assert all(kernels[p]["ms"] > 0 for p in ("bf16", "int8", "int8_fp8", "int8 quantization alone",
                                           "int8 quantization in PyTorch ops"))
    # The 16-bit path: its bf16 output's rounding (2^-8); the 8-bit ones within their formats' steps.
    assert kernels["bf16"]["rel_l2"] < 2 * 2.0 ** -8
    assert kernels["int8"]["rel_l2"] < 0.03 and kernels["int8_fp8"]["rel_l2"] < 0.05
