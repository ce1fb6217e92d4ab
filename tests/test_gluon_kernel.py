"""The Hopper Gluon block-sparse kernel.

There is no CPU interpreter for Gluon, so on CPU the kernel is compiled ahead of time for sm_90a (the
Triton wheel ships ptxas) and checked for spills and shared-memory size; its numerics are tested on an
H100/H200 (``SPARSEDIFF_TEST_DEVICE=cuda``) against the float64 reference, through the public entry point.
"""

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_kernels import low_precision_lse_tolerance

from sparsediff.kernels import block_sparse_attention, mask_to_index
from sparsediff.kernels.block_sparse.reference import block_sparse_attention_ref
from sparsediff.testing.tolerance import assert_within_baseline

HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)
SMEM_LIMIT = 227 * 1024  # bytes of shared memory a CTA may use on sm_90


AOT_VARIANTS = [
    # head dim, dtype, even N (no tail masking), write LSE, causal, live rows, INT8 Q·Kᵀ, FP8 P·V, per-block key scales
    (128, "bfloat16", True, True, False, False, False, False),
    (128, "float16", False, False, False, False, False, False),
    (64, "bfloat16", False, True, False, False, False, False),
    (128, "bfloat16", True, True, True, False, False, False),
    (128, "bfloat16", True, True, False, True, False, False),
    (128, "bfloat16", True, True, False, False, True, False),
    (64, "float16", False, True, True, False, True, False),
    (128, "bfloat16", True, True, False, False, True, True),
    (64, "float16", False, True, True, False, True, True),
    (128, "bfloat16", True, True, False, False, True, False, False),
    (128, "bfloat16", True, True, True, False, True, True, False),
    # schedule ablations: exponentials partly on the FMA units, block ids loaded in place
    (128, "bfloat16", False, True, True, False, False, False, True, {"exp2_poly": 1}),
    (128, "bfloat16", True, True, False, False, True, True, True, {"exp2_poly": 2, "pair_tiles": False}),
    (128, "bfloat16", False, True, True, False, True, True, True, {"pair_tiles": False}),  # int8_fp8, one block
    (128, "bfloat16", False, True, True, False, True, False, True, {"prefetch_ids": False}),
    (128, "bfloat16", True, True, True, False, True, True, True, {"fp8_p_shared": False}),
    (128, "bfloat16", False, True, True, False, True, False, True, {"tree_reduce": True}),
    (64, "float16", True, True, False, False, False, False, True, {"tree_reduce": True}),
    # two key blocks per softmax step (8-bit, per-block key scales): plain, causal and ragged, D 64, FP8 P in regs
    (128, "bfloat16", True, True, False, False, True, False, True, {"pair_tiles": True}),
    (128, "bfloat16", False, True, True, False, True, True, True, {"pair_tiles": True}),
    (64, "float16", False, True, True, False, True, False, True, {"pair_tiles": True}),
    (128, "bfloat16", True, True, False, False, True, True, True, {"pair_tiles": True, "fp8_p_shared": False}),
]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the ahead-of-time check is for machines without a GPU")
def test_compiles_for_sm90_without_spills(tmp_path):
    # In a fresh process: under TRITON_INTERPRET=1 (set for this test session) Gluon cannot compile.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = Path(__file__).resolve().parents[1]
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, str(Path(__file__).with_name("gluon_aot.py")), str(tmp_path),
                           json.dumps(AOT_VARIANTS)], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(results) == len(AOT_VARIANTS)
    for res in results:
        assert ".target sm_90a" in res["ptx_head"]
        # Warp specialization moves registers between warpgroups; both GEMMs are async wgmma fed by TMA.
        assert res["setmaxnreg"] and res["wgmma"] > 0 and res["tma_4d"] > 0, res
        assert res["shared"] <= SMEM_LIMIT, res
        assert re.search(r"LOCAL:0\b", res["usage"]), f"register spills to local memory: {res}"
        assert re.search(r"STACK:0\b", res["usage"]), res


@pytest.mark.skipif(torch.cuda.is_available(), reason="the ahead-of-time check is for machines without a GPU")
def test_eight_bit_loop_overlaps_its_softmax_with_pv(tmp_path):
    # In the 8-bit kernels' one-block loop the wait for P·V(j-1) must come after the exponentials of tile j (ptxas
    # moves it above them in the 16-bit loop, where it measured harmless; docs/eight_bit.md). The pair schedule
    # (int8_fp8's default) has no in-warpgroup overlap.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = Path(__file__).resolve().parents[1]
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
    out = tmp_path / "sass.json"
    proc = subprocess.run([sys.executable, str(root / "benchmarks" / "sass_gluon.py"), "--out", str(out),
                           "--schedule", '{"pair_tiles": false}'],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    kernels = json.loads(out.read_text())["kernels"]
    for name in ("int8", "int8_fp8"):
        order = kernels[name]["order"]
        # the loop: Q·Kᵀ (IGMMA) and P·V issued together, then wait(1), exponentials, wait(0)
        starts = [i for i in range(len(order) - 1) if order[i].startswith("IGMMA") and
                  order[i + 1].startswith(("HGMMA", "QGMMA"))]
        assert starts, order
        tail = order[starts[0] + 2:starts[0] + 5]
        assert tail[0].startswith("WARPGROUP.DEPBAR") and tail[1].startswith("MUFU.EX2x"), (name, tail)
        assert int(tail[1].split("x")[-1]) >= 32 and tail[2].startswith("WARPGROUP.DEPBAR"), (name, tail)
        assert kernels[name]["counts"]["MUFU"] > 0


def test_schedule_resolution_picks_pairs_where_they_were_measured_faster():
    from sparsediff.kernels.block_sparse.gluon import PAIR_STAGES, resolve_schedule

    # int8_fp8 (FP8 P·V through shared memory): two key blocks per step, stages counting pairs
    cfg = resolve_schedule({}, eight_bit=True, fp8_pv=True)
    assert cfg["pair_tiles"] and cfg["stages"] == PAIR_STAGES
    assert resolve_schedule({"stages": 3}, eight_bit=True, fp8_pv=True)["stages"] == 3
    # int8, FP8 P in registers, ping-pong, per-token keys and 16 bits keep one block per step
    assert not resolve_schedule({}, eight_bit=True, fp8_pv=False)["pair_tiles"]
    assert not resolve_schedule({"fp8_p_shared": False}, eight_bit=True, fp8_pv=True)["pair_tiles"]
    assert not resolve_schedule({"pingpong": True}, eight_bit=True, fp8_pv=True)["pair_tiles"]
    assert not resolve_schedule({"int8_tile_k": False}, eight_bit=True, fp8_pv=True)["pair_tiles"]
    assert resolve_schedule({}, eight_bit=False, fp8_pv=False)["stages"] == 3
    # asked for where they cannot run: a clear error, not a silent change of schedule
    with pytest.raises(ValueError, match="pair_tiles needs an 8-bit precision"):
        resolve_schedule({"pair_tiles": True}, eight_bit=False, fp8_pv=False)
    with pytest.raises(ValueError, match="int8_tile_k=True"):
        resolve_schedule({"pair_tiles": True, "int8_tile_k": False}, eight_bit=True, fp8_pv=True)
    with pytest.raises(ValueError, match="pair_tiles runs without ping-pong"):
        resolve_schedule({"pair_tiles": True, "pingpong": True}, eight_bit=True, fp8_pv=False)
    with pytest.raises(ValueError, match="unknown schedule options"):
        resolve_schedule({"pairs": True}, eight_bit=True, fp8_pv=True)


def test_forcing_gluon_where_it_does_not_apply_names_what_it_supports():
    q = torch.randn(1, 2, 256, 128, dtype=torch.bfloat16, device="cpu")
    index, count = mask_to_index(torch.ones(1, 1, 2, 2, dtype=torch.bool, device="cpu"))
    with pytest.raises(ValueError, match="sm_90"):
        block_sparse_attention(q, q, q, index, count, backend="gluon")


gpu = pytest.mark.skipif(not HOPPER, reason="needs an sm_90 GPU (H100/H200)")


def _check(q, k, v, index, count, causal=False, **kw):
    out, lse = block_sparse_attention(q, k, v, index, count, return_lse=True, block_size=128, causal=causal, **kw)
    ref, ref_lse = block_sparse_attention_ref(q.double(), k.double(), v.double(), index, count, block_size=128,
                                              causal=causal)
    lowp, _ = block_sparse_attention_ref(q, k, v, index, count, block_size=128, upcast=False, causal=causal)
    assert_within_baseline(out, ref, lowp)
    empty = torch.isneginf(ref_lse)
    assert torch.equal(torch.isneginf(lse), empty)
    torch.testing.assert_close(lse.double(), ref_lse, **low_precision_lse_tolerance(ref_lse))
    assert (out[empty] == 0).all()
    return out, lse


@gpu
@pytest.mark.parametrize("b,hq,hkv,nq,nk,d,dtype,density,causal", [
    (1, 4, 4, 1024, 1024, 128, torch.bfloat16, 0.5, False),
    (2, 8, 2, 1000, 1000, 128, torch.bfloat16, 0.4, False),  # GQA, ragged tails on both sides
    (1, 4, 1, 300, 1100, 64, torch.float16, 0.6, False),  # MQA, Nq != Nk
    (1, 2, 2, 777, 777, 64, torch.float16, 1.0, False),
    (1, 2, 2, 2048, 4096, 128, torch.float16, 0.2, False),
    (2, 8, 2, 1000, 1000, 128, torch.bfloat16, 0.6, True),  # causal, ragged: diagonal tiles masked
    (1, 4, 1, 300, 1100, 64, torch.float16, 0.7, True),  # causal, end-aligned to a prefix
    (1, 2, 2, 1024, 1024, 128, torch.bfloat16, 1.0, True),
])
def test_matches_reference(b, hq, hkv, nq, nk, d, dtype, density, causal):
    g = torch.Generator(device="cuda").manual_seed(nq + nk)
    q = torch.randn(b, hq, nq, d, dtype=dtype, device="cuda", generator=g)
    k = torch.randn(b, hkv, nk, d, dtype=dtype, device="cuda", generator=g)
    v = torch.randn(b, hkv, nk, d, dtype=dtype, device="cuda", generator=g)
    mask = torch.rand(b, hq, math.ceil(nq / 128), math.ceil(nk / 128), device="cuda", generator=g) < density
    mask[0, 0, 0] = False  # an empty query block: zeros and -inf
    index, count = mask_to_index(mask)
    out, _ = _check(q, k, v, index, count, causal=causal, backend="gluon")
    tri = block_sparse_attention(q, k, v, index, count, block_size=128, causal=causal, backend="triton")
    # Two low-precision kernels agree within 2e-2 (about 2.5 bfloat16 epsilons at |out| ~ 1); GPU-only, kept as set.
    assert (out.float() - tri.float()).abs().max().item() < 2e-2


@gpu
@pytest.mark.parametrize("schedule", [dict(exp2_poly=1), dict(exp2_poly=2), dict(prefetch_ids=False),
                                      dict(fp8_p_shared=False), dict(tree_reduce=True), dict(pair_tiles=True),
                                      dict(pair_tiles=True, tree_reduce=True, exp2_poly=1)])
@pytest.mark.parametrize("causal", [False, True])
def test_schedule_ablations_match_reference(schedule, causal, monkeypatch):
    # Causal and ragged: masked tiles must still give exact zeros (the polynomial clamps, so they use the MUFU).
    from sparsediff.kernels.block_sparse import gluon

    for key, value in schedule.items():
        monkeypatch.setitem(gluon.DEFAULT_SCHEDULE, key, value)
    g = torch.Generator(device="cuda").manual_seed(7)
    q, k, v = (torch.randn(2, 4, 1000, 128, dtype=torch.bfloat16, device="cuda", generator=g) for _ in range(3))
    mask = torch.rand(2, 4, 8, 8, device="cuda", generator=g) < 0.6
    mask[0, 0, 0] = False
    mask[0, 1, 1] = torch.arange(8) == 1  # one kept block: a pair's partner is missing from the start
    mask[0, 1, 2] = torch.arange(8) < 3  # odd: a full pair, then a lone block
    index, count = mask_to_index(mask)
    _check(q, k, v, index, count, causal=causal, backend="gluon")
    for precision in ("int8", "int8_fp8"):
        out = block_sparse_attention(q, k, v, index, count, block_size=128, causal=causal, precision=precision,
                                     backend="gluon")
        ref, _ = block_sparse_attention_ref(q.double(), k.double(), v.double(), index, count, block_size=128,
                                            causal=causal)
        rel = ((out.double() - ref).norm() / ref.norm()).item()
        assert rel < (0.02 if precision == "int8" else 0.05), (precision, rel)


@gpu
def test_strided_inputs_and_broadcast_index():
    # (B, N, H, D) tensors seen as (B, H, N, D), as attention processors pass them: no copies needed.
    q, k, v = (torch.randn(2, 640, 4, 128, dtype=torch.bfloat16, device="cuda").transpose(1, 2) for _ in range(3))
    index, count = mask_to_index(torch.rand(1, 1, 5, 5, device="cuda") < 0.5)
    _check(q, k, v, index, count, backend="gluon")


@gpu
@pytest.mark.parametrize("repeat", [1, 3])
def test_live_rows_skip_dead_halves_and_leave_live_rows_bit_equal(repeat):
    # live_rows (per batch row): 64-row halves of q past them are skipped (zeros, -inf); every row below
    # them is bit-equal to the full computation, whatever repeat_q does with the query blocks.
    g = torch.Generator(device="cuda").manual_seed(repeat)
    q = torch.randn(4, 4, 256, 128, dtype=torch.bfloat16, device="cuda", generator=g)
    k, v = (torch.randn(4, 2, 1000, 128, dtype=torch.bfloat16, device="cuda", generator=g) for _ in range(2))
    mask = torch.rand(4, 4, 2 * repeat, 8, device="cuda", generator=g) < 0.6
    mask[..., 0] = True
    index, count = mask_to_index(mask)
    live = torch.tensor([0, 40, 64, 200], dtype=torch.int32, device="cuda")
    full, full_lse = block_sparse_attention(q, k, v, index, count, return_lse=True, repeat_q=repeat, backend="gluon")
    out, lse = block_sparse_attention(q, k, v, index, count, return_lse=True, repeat_q=repeat, backend="gluon",
                                      live_rows=live)
    rows = torch.arange(256 * repeat, device="cuda") % 256  # row of q each output row reads
    for b, n in enumerate(live.tolist()):
        keep = rows < n
        assert torch.equal(out[b][:, keep], full[b][:, keep]) and torch.equal(lse[b][:, keep], full_lse[b][:, keep])
        skipped = rows >= -(-n // 64) * 64  # whole halves past the live rows
        assert bool((out[b][:, skipped] == 0).all()) and bool(torch.isneginf(lse[b][:, skipped]).all())


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_live_rows_are_checked_and_skip_query_blocks_past_them(backend):
    # Every backend: a query block with no row below live_rows keeps nothing (zeros, -inf); rows below it
    # are what the call without live_rows gives. repeat_q reads q's blocks again: the same rule per copy.
    dev = torch.get_default_device()  # CPU (the interpreter) in CI, the GPU with SPARSEDIFF_TEST_DEVICE=cuda
    g = torch.Generator().manual_seed(1)
    q = torch.randn(3, 2, 256, 64, generator=g, device="cpu").to(dev, torch.bfloat16)
    k = torch.randn(3, 2, 384, 64, generator=g, device="cpu").to(dev, torch.bfloat16)
    index, count = mask_to_index(torch.ones(1, 1, 4, 3, dtype=torch.bool, device=dev))
    with pytest.raises(ValueError, match="live_rows must be an int32"):
        block_sparse_attention(q, k, k, index, count, backend=backend, repeat_q=2,
                               live_rows=torch.tensor([1, 2, 3], device=dev))
    live = torch.tensor([0, 100, 130], dtype=torch.int32, device=dev)
    full, full_lse = block_sparse_attention(q, k, k, index, count, backend=backend, repeat_q=2, return_lse=True)
    out, lse = block_sparse_attention(q, k, k, index, count, backend=backend, repeat_q=2, return_lse=True,
                                      live_rows=live)
    rows = torch.arange(512, device=dev) % 256
    for b, n in enumerate(live.tolist()):
        keep = rows < n
        assert torch.equal(out[b][:, keep], full[b][:, keep]) and torch.equal(lse[b][:, keep], full_lse[b][:, keep])
        dead = rows >= -(-n // 128) * 128  # whole query blocks past the live rows
        assert bool((out[b][:, dead] == 0).all()) and bool(torch.isneginf(lse[b][:, dead]).all())


@gpu
def test_structured_masks_and_sinks():
    n, blocks = 2048, 16
    q, k, v = (torch.randn(1, 2, n, 128, dtype=torch.bfloat16, device="cuda") for _ in range(3))
    k[:, :, :4] *= 8  # heavy sink keys in block 0
    i = torch.arange(blocks, device="cuda")
    local = (i[:, None] - i[None, :]).abs() <= 1
    mask = (local | (i[None, :] == 0) | (i[None, :] == 9)).expand(1, 2, blocks, blocks)
    index, count = mask_to_index(mask)
    _check(q, k, v, index, count, backend="gluon")


@gpu
def test_default_backend_picks_gluon_and_falls_back(monkeypatch):
    from sparsediff.kernels.block_sparse import gluon as block_sparse_gluon
    from sparsediff.kernels.block_sparse import triton as block_sparse_triton

    calls = []
    real_gluon = block_sparse_gluon.block_sparse_attention_gluon
    real_triton = block_sparse_triton.block_sparse_attention_triton
    monkeypatch.setattr(block_sparse_gluon, "block_sparse_attention_gluon",
                        lambda *a, **kw: calls.append("gluon") or real_gluon(*a, **kw))
    monkeypatch.setattr(block_sparse_triton, "block_sparse_attention_triton",
                        lambda *a, **kw: calls.append("triton") or real_triton(*a, **kw))
    q = torch.randn(1, 2, 512, 128, dtype=torch.bfloat16, device="cuda")
    index, count = mask_to_index(torch.ones(1, 1, 4, 4, dtype=torch.bool, device="cuda"))
    block_sparse_attention(q, q, q, index, count)
    block_sparse_attention(q, q, q, index, count, causal=True)
    block_sparse_attention(q, q, q, index, count, backend="triton")
    q96 = torch.randn(1, 2, 512, 96, dtype=torch.bfloat16, device="cuda")
    block_sparse_attention(q96, q96, q96, index, count)  # head dim 96: outside its scope, Triton
    monkeypatch.setenv("SPARSEDIFF_GLUON", "0")
    block_sparse_attention(q, q, q, index, count)
    assert calls == ["gluon", "gluon", "triton", "triton", "triton"]
    with pytest.raises(ValueError, match="head dims 64 and 128"):
        block_sparse_attention(q96, q96, q96, index, count, backend="gluon")


@pytest.mark.skipif(torch.cuda.is_available(), reason="drives the Triton interpreter on CPU tensors")
def test_a_gluon_build_failure_falls_back_to_triton_with_a_warning(monkeypatch, caplog):
    # Stands for a Triton release whose Gluon API differs: the first build fails, Triton takes over for good.
    from sparsediff import _logging
    from sparsediff.kernels import block_sparse
    from sparsediff.kernels.block_sparse import gluon as block_sparse_gluon

    calls = []

    def broken(*args, **kwargs):
        calls.append(1)
        raise AttributeError("module 'gluon' has no attribute 'warp_specialize'")

    monkeypatch.setitem(block_sparse._gluon_failures, "16-bit", None)
    monkeypatch.setattr(_logging, "_warned", set())
    monkeypatch.setattr(block_sparse, "resolve_backend", lambda backend, q, block_size=None: "triton")
    monkeypatch.setattr(block_sparse_gluon, "gluon_support_error", lambda *a, **kw: None)
    monkeypatch.setattr(block_sparse_gluon, "block_sparse_attention_gluon", broken)
    q, k, v = (torch.randn(1, 2, 64, 32, device="cpu") for _ in range(3))
    index, count = mask_to_index(torch.rand(1, 1, 2, 2, device="cpu") < 0.7)
    with caplog.at_level("WARNING"):
        out = block_sparse_attention(q.half(), k.half(), v.half(), index, count, block_size=32)
        again = block_sparse_attention(q.half(), k.half(), v.half(), index, count, block_size=32)
    assert calls == [1]  # never tried again
    assert "could not be built" in caplog.text and "warp_specialize" in caplog.text
    want = block_sparse_attention(q.half(), k.half(), v.half(), index, count, block_size=32, backend="triton")
    assert torch.equal(out, want) and torch.equal(again, want)


@pytest.mark.skipif(torch.cuda.is_available(), reason="drives the Triton interpreter on CPU tensors")
def test_an_8bit_gluon_build_failure_falls_back_on_its_own(monkeypatch, caplog):
    # The 8-bit variant failing leaves the 16-bit Gluon kernel enabled; the Triton 8-bit kernel takes over.
    from sparsediff import _logging
    from sparsediff.kernels import block_sparse
    from sparsediff.kernels.block_sparse import gluon as block_sparse_gluon

    calls = []

    def broken(*args, **kwargs):
        calls.append(1)
        raise AttributeError("no 8-bit wgmma here")

    monkeypatch.setenv("SPARSEDIFF_GLUON_INT8", "1")
    monkeypatch.setattr(block_sparse, "_gluon_failures", {"16-bit": None, "8-bit": None})
    monkeypatch.setattr(_logging, "_warned", set())
    monkeypatch.setattr(block_sparse_gluon, "gluon_support_error", lambda *a, **kw: None)
    monkeypatch.setattr(block_sparse_gluon, "block_sparse_attention_gluon_int8", broken)
    q, k, v = (torch.randn(1, 2, 64, 32, device="cpu").bfloat16() for _ in range(3))
    index, count = mask_to_index(torch.rand(1, 1, 2, 2, device="cpu") < 0.7)
    with caplog.at_level("WARNING"):
        out = block_sparse_attention(q, k, v, index, count, block_size=32, precision="int8")
        block_sparse_attention(q, k, v, index, count, block_size=32, precision="int8")
    assert calls == [1] and "8-bit Gluon kernel could not be built" in caplog.text
    assert block_sparse.gluon_enabled("16-bit") and not block_sparse.gluon_enabled("8-bit")
    want = block_sparse_attention(q, k, v, index, count, block_size=32, precision="int8", backend="triton")
    assert torch.equal(out, want)


def test_the_8bit_gluon_variant_is_on_unless_switched_off(monkeypatch):
    from sparsediff.kernels import block_sparse

    monkeypatch.setattr(block_sparse, "_gluon_failures", {"16-bit": None, "8-bit": None})
    monkeypatch.delenv("SPARSEDIFF_GLUON_INT8", raising=False)
    monkeypatch.delenv("SPARSEDIFF_GLUON", raising=False)
    assert block_sparse.gluon_enabled("8-bit") == block_sparse.triton_available()
    monkeypatch.setenv("SPARSEDIFF_GLUON_INT8", "0")
    assert not block_sparse.gluon_enabled("8-bit")
    assert block_sparse.gluon_enabled("16-bit") == block_sparse.triton_available()
