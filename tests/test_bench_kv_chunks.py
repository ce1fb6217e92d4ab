"""The 64k experiment's chunked schedule computes the same attention as one call."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import torch

from sparsediff.kernels import index_to_mask, mask_to_index

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("bench_kv_chunks", ROOT / "benchmarks" / "bench_kv_chunks.py")
bench_kv_chunks = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench_kv_chunks)


def test_split_index_partitions_the_kept_blocks():
    # Drawn on the CPU (the same mask on every device), then on the default device as the other tensors.
    g = torch.Generator().manual_seed(0)
    mask = (torch.rand(1, 2, 9, 9, generator=g, device="cpu") < 0.4).to(torch.get_default_device())
    index, count = mask_to_index(mask)
    parts = bench_kv_chunks.split_index(index, count, 9, 4)
    masks = [index_to_mask(i, c, 9) for i, c in parts]
    assert torch.equal(torch.stack(masks).sum(0), mask.long())  # each kept block in exactly one chunk
    width = 3  # ceil(9 / 4)
    for c, m in enumerate(masks):
        assert not m[..., : c * width].any() and not m[..., (c + 1) * width:].any()


def test_quick_run_chunked_equals_single(tmp_path):
    out = tmp_path / "kv.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_kv_chunks.py"), "--quick", "--out",
                           str(out)], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert {r["density"] for r in rows} == {1.0, 0.5} and "near_ms" in rows[1]
    for r in rows:  # float32 on CPU: the merge through the LSE is exact up to rounding
        assert r["chunks2_rel_l2"] < 1e-5 and r["chunks4_rel_l2"] < 1e-5 and r["chunks4_ms"] > 0


def test_quick_variance_run_covers_masks_and_data(tmp_path):
    out = tmp_path / "kvv.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_kv_chunks.py"), "--quick", "--variance",
                           "--out", str(out)], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert {(r["mask"], r["mask_seed"]) for r in rows} == {("exact", 0), ("exact", 1), ("exact", 2), ("bernoulli", 0),
                                                           ("bernoulli", 1)}
    assert {(r["data_seed"], r["key_offset"]) for r in rows} == {(0, 0.0), (0, 1.0), (1, 0.0)}
    exact = [r for r in rows if r["mask"] == "exact"]
    assert all(r["kept"] == 0.5 and r["ms"] > 0 for r in exact)  # the same kept count in every query block
    assert all(r["kept"] >= 0.5 - 0.1 for r in rows if r["mask"] == "bernoulli")
