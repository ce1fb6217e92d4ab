"""Programmatic dependent launch (``SPARSEDIFF_PDL=1``): off by default and off where it cannot run; on a
Hopper GPU the LoSA and FlashBlock steps give the same bits with it as without, eager, in their own CUDA graphs
and inside a host's graph of the whole block (where LoSA's window runs on a branch stream)."""

import pytest
import torch
from test_losa import drive_growing, growing_run

from sparsediff.kernels.pdl import pdl_enabled, pdl_kwargs
from sparsediff.methods import denoising_step, make_method, new_block

hopper = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9,
                            reason="programmatic dependent launch needs a GPU of compute capability 9.0 or newer")


def test_off_by_default_and_on_cpu(monkeypatch):
    x = torch.zeros(1, device="cpu")
    monkeypatch.delenv("SPARSEDIFF_PDL", raising=False)
    assert pdl_kwargs(x) == {"USE_PDL": False, "launch_pdl": False}
    monkeypatch.setenv("SPARSEDIFF_PDL", "1")
    assert not pdl_enabled(x)  # CPU tensors (the Triton interpreter) never launch with it


@hopper
def test_enabled_on_hopper_only_when_asked(monkeypatch):
    x = torch.zeros(1, device="cuda")
    monkeypatch.delenv("SPARSEDIFF_PDL", raising=False)
    assert not pdl_enabled(x)
    monkeypatch.setenv("SPARSEDIFF_PDL", "1")
    assert pdl_kwargs(x) == {"USE_PDL": True, "launch_pdl": True}


def run_growing(monkeypatch, name, kw, pdl, graphs):
    monkeypatch.setenv("SPARSEDIFF_PDL", "1" if pdl else "0")
    plan = growing_run(blocks=3, steps=5, prompt=8000, nq=32, hq=8, d=64, dtype=torch.bfloat16, device="cuda")
    m = make_method(name, min_seq_len=0, cuda_graphs=graphs, **kw)
    outs = drive_growing(m, plan)
    torch.cuda.synchronize()
    return outs, m


CONFIGS = [("losa", {}), ("losa", dict(outlier_keys=True)), ("losa", dict(compare_to="cached", threshold=0.1)),
           ("losa", dict(threshold=0.0, sparsity=0.0)), ("flashblock", {})]


@hopper
@pytest.mark.parametrize("name, kw", CONFIGS)
@pytest.mark.parametrize("graphs", [False, True])
def test_same_bits_with_and_without_pdl(monkeypatch, name, kw, graphs):
    want, m0 = run_growing(monkeypatch, name, kw, pdl=False, graphs=False)
    got, m1 = run_growing(monkeypatch, name, kw, pdl=True, graphs=graphs)
    for (o, lse), (o2, lse2) in zip(want, got):
        assert torch.equal(o, o2) and torch.equal(lse, lse2)
    if name == "losa":
        assert m0.step_report() == m1.step_report()
    if graphs:  # the launches were captured (a failed capture would have run eager with a warning)
        assert m1._cache.captures > 0 and m1._cache.graphs()


@hopper
def test_same_bits_inside_a_host_graph_of_the_block(monkeypatch):
    # The host captures a whole block; LoSA's window then runs on a branch stream of that graph.
    gen = torch.Generator().manual_seed(1)
    prefix, nq, steps = 16384, 32, 6

    def randn(*shape):
        return torch.randn(shape, generator=gen, device="cpu").to("cuda", torch.bfloat16)

    kbuf, vbuf = randn(1, 8, prefix + nq, 128), randn(1, 8, prefix + nq, 128)
    qs = [randn(1, 32, nq, 128)]
    for _ in range(steps - 1):  # a quarter of the tokens move each step
        moved = torch.rand(nq, generator=gen, device="cpu") < 0.25
        qs.append(qs[-1] + randn(1, 32, nq, 128) * moved.to("cuda")[None, None, :, None] * 0.5)
    kbs, vbs = [randn(1, 8, nq, 128) for _ in range(steps)], [randn(1, 8, nq, 128) for _ in range(steps)]
    counter = [0]

    def block(m, record):
        counter[0] += 1
        new_block(counter[0])
        for i in range(steps):
            kbuf[:, :, prefix:].copy_(kbs[i])
            vbuf[:, :, prefix:].copy_(vbs[i])
            with denoising_step(i, steps):
                out = m(qs[i], kbuf, vbuf, layer="l")
            if record is not None:
                record.append(out)

    monkeypatch.setenv("SPARSEDIFF_PDL", "0")
    want = []
    block(make_method("losa", min_seq_len=0, cuda_graphs=False), want)
    monkeypatch.setenv("SPARSEDIFF_PDL", "1")
    m = make_method("losa", min_seq_len=0, cuda_graphs=False)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up outside the capture: state allocated, kernels compiled
        block(m, None)
        block(m, None)
    torch.cuda.current_stream().wait_stream(stream)
    graph, got = torch.cuda.CUDAGraph(), []
    with torch.cuda.graph(graph):
        block(m, got)
    graph.replay()
    torch.cuda.synchronize()
    assert all(torch.equal(a, b) for a, b in zip(want, got))


@pytest.mark.skipif(torch.cuda.is_available(), reason="the ahead-of-time check is for machines without a GPU")
def test_every_pdl_kernel_compiles_for_sm90_with_the_wait_first():
    # In a fresh process without TRITON_INTERPRET: each kernel taking USE_PDL, compiled for sm_90a through the
    # public function that launches it, waits for the kernel before at its very start and lets the next one launch.
    import ast
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    declared = set()
    for path in (root / "sparsediff").rglob("*.py"):  # kernels/ and the methods that hold their own kernels
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef) and any(a.arg == "USE_PDL" for a in node.args.args):
                declared.add(node.name)
    declared.discard("pdl_start")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), str(root / "tests"), env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, str(Path(__file__).with_name("pdl_aot.py"))], capture_output=True,
                          text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(results) == declared and len(declared) == 10
    for name, res in results.items():
        assert res == {"launch_pdl": True, "target": 90, "wait": 1, "launch_dependents": 1, "wait_first": True}, name


def test_warns_once_on_a_gpu_older_than_hopper(monkeypatch, caplog):
    from sparsediff.kernels import pdl

    class OldGpu:  # stands in for a CUDA tensor on a compute capability 8.0 device
        is_cuda, device = True, "cuda:7"

    monkeypatch.setenv("SPARSEDIFF_PDL", "1")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: "NVIDIA A100")
    pdl._capability.cache_clear()
    try:
        with caplog.at_level("WARNING"):
            assert not pdl.pdl_enabled(OldGpu()) and not pdl.pdl_enabled(OldGpu())
    finally:
        pdl._capability.cache_clear()
    assert [r.getMessage() for r in caplog.records] == [
        "SPARSEDIFF_PDL=1: programmatic dependent launch needs compute capability 9.0 or newer (NVIDIA A100 has "
        "8.x); kernels launch without it"]
