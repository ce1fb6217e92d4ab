"""The block-diffusion benchmark's CPU smoke run: every column it reports is there and consistent."""

import json
import subprocess
import sys
from pathlib import Path

import torch

from sparsediff.testing.tolerance import ROUNDING, tolerance

ROOT = Path(__file__).resolve().parents[1]
EXACT = tolerance(torch.float32, ulps=ROUNDING)["rtol"]  # relative L2 of a float32 recompute: a few roundings


def test_quick_run_reports_ratios_against_the_fastest_dense_peer(tmp_path):
    out = tmp_path / "bench.json"
    script = ROOT / "benchmarks" / "bench_blockdiff.py"
    cmd = [sys.executable, str(script), "--quick", "--out", str(out), "--losa-splits", "3", "--pdl"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (row,) = json.loads(out.read_text())["rows"]
    peers = [p for p in ("sdpa", "flash", "cudnn", "flex") if f"dense_{p}_ms" in row]
    assert peers == ["sdpa"]  # on CPU only SDPA's own choice
    assert row["dense_best_ms"] == min(row[f"dense_{p}_ms"] for p in peers)
    for name in ("flashblock", "losa", "flashblock+sparse"):
        assert row[f"{name}_speedup"] == row["dense_best_ms"] / row[f"{name}_ms"]
        assert row[f"{name}_prefix_speedup"] == row["dense_best_prefix_ms"] / row[f"{name}_ms"]
        errors = row[f"{name}_err"]
        assert len(errors) == row["steps"] and errors[0] < EXACT  # the block's first step is exact
    assert 0 < row["losa_active_share"] <= 1 and 0 < row["losa_union_density"] <= 1
    # LoSA with its union attention in 3 key chunks: the same attention up to rounding, the same statistics
    assert max(abs(a - b) for a, b in zip(row["losa/s3_err"], row["losa_err"])) < EXACT
    assert row["losa/s3_active_share"] == row["losa_active_share"]
    # --pdl: the same methods again (programmatic dependent launch only exists on CUDA): the same bits
    assert row["losa+pdl_equal_without_pdl"] and row["flashblock+pdl_equal_without_pdl"]
    assert row["losa+pdl_err"] == row["losa_err"]
    assert "x best / x prefix >= / x sdpa" in proc.stdout


def _bench_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_blockdiff", ROOT / "benchmarks" / "bench_blockdiff.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_pdl_env_without_pdl_leaves_the_environment_alone(monkeypatch):
    # Without --pdl the benchmark runs every method under pdl_env(None); SPARSEDIFF_PDL is usually unset.
    import os

    pdl_env = _bench_module().pdl_env
    monkeypatch.delenv("SPARSEDIFF_PDL", raising=False)
    with pdl_env(None):
        assert "SPARSEDIFF_PDL" not in os.environ
    assert "SPARSEDIFF_PDL" not in os.environ
    with pdl_env(True):
        assert os.environ["SPARSEDIFF_PDL"] == "1"
    assert "SPARSEDIFF_PDL" not in os.environ  # unset again, as before
    monkeypatch.setenv("SPARSEDIFF_PDL", "1")
    with pdl_env(False):
        assert os.environ["SPARSEDIFF_PDL"] == "0"
    with pdl_env(None):
        assert os.environ["SPARSEDIFF_PDL"] == "1"
    assert os.environ["SPARSEDIFF_PDL"] == "1"
