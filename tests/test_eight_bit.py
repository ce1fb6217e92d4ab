"""The 8-bit block-sparse kernel (``precision="int8"`` / ``"int8_fp8"``) against the float64 reference, on random
inputs and on real captured q/k/v, next to the 16-bit kernel's own error; and its errors and method plumbing.

The bound is the 8-bit format's, not the dtype's: INT8 keeps 7 bits of each token's largest entry (relative
step 1/127) and FP8 e4m3 3 mantissa bits (relative step 1/16), so the output's relative L2 error is a few
percent where the 16-bit kernel's is a few tenths of a percent. The acceptance is a cosine similarity of at
least 0.999 to the exact output, for both precisions, on random and on real inputs (measured: ``"int8"``
0.9996-1.0000, ``"int8_fp8"`` 0.9993-0.9999).
"""

import math

import pytest
import torch

from sparsediff.kernels import block_sparse_attention, mask_to_index
from sparsediff.kernels.block_sparse.quantize import quantize_tiles
from sparsediff.kernels.block_sparse.reference import block_sparse_attention_ref
from sparsediff.methods import make_method
from sparsediff.testing.tolerance import ROUNDING, tolerance

# Relative L2 bounds of the 8-bit output (the formats' steps above, with margin over what the tests measure).
REL_L2 = {"int8": 0.03, "int8_fp8": 0.05}
MIN_COSINE = 0.999


def _index(nq, nk, bs, causal, density=0.6):
    mask = torch.rand(1, 1, math.ceil(nq / bs), math.ceil(nk / bs), device="cpu") < density
    mask[..., 0] = True
    if causal:
        mask |= torch.eye(mask.shape[-2], mask.shape[-1], dtype=torch.bool, device=mask.device)
    return mask_to_index(mask)


def _errors(out, ref):
    out, ref = out.double().cpu(), ref.double().cpu()
    rel = float((out - ref).norm() / ref.norm())
    cos = float(torch.nn.functional.cosine_similarity(out.flatten(), ref.flatten(), dim=0))
    return rel, cos


@pytest.mark.parametrize("precision", ["int8", "int8_fp8"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_matches_the_reference_on_random_inputs(precision, causal, dtype, device):
    # GQA 4/2, a ragged tail (Nk not a multiple of the block), keys with a shared offset (smoothing's case).
    q = torch.randn(1, 4, 200, 64, device=device).to(dtype)
    k = (torch.randn(1, 2, 200, 64, device=device) + 2.0).to(dtype)
    v = torch.randn(1, 2, 200, 64, device=device).to(dtype)
    index, count = (t.to(device) for t in _index(200, 200, 64, causal))
    ref, ref_lse = block_sparse_attention_ref(q.double(), k.double(), v.double(), index, count, block_size=64,
                                              causal=causal)
    out, lse = block_sparse_attention(q, k, v, index, count, block_size=64, causal=causal, return_lse=True,
                                      precision=precision)
    assert out.dtype == dtype and lse.dtype == torch.float32
    rel, cos = _errors(out, ref)
    assert rel < REL_L2[precision] and cos > MIN_COSINE, (rel, cos)
    # The LSE is the unsmoothed one: within the scores' 8-bit rounding (a few hundredths of a nat).
    finite = torch.isfinite(ref_lse)
    assert torch.equal(finite.cpu(), torch.isfinite(lse).cpu())
    assert (lse.double() - ref_lse)[finite].abs().max() < 0.05


@pytest.mark.parametrize("precision", ["int8", "int8_fp8"])
def test_on_real_captured_qkv(precision, real_qkv):
    # A real SmolLM2 layer (outlier channels, causal): cosine >= 0.999 and the error reported next to 16-bit's.
    q, k, v = (t.to(torch.bfloat16) for t in real_qkv)
    index, count = (t.to(q.device) for t in _index(q.shape[2], k.shape[2], 64, True, density=0.5))
    ref, _ = block_sparse_attention_ref(q.double(), k.double(), v.double(), index, count, block_size=64, causal=True)
    out = block_sparse_attention(q, k, v, index, count, block_size=64, causal=True, precision=precision)
    out16 = block_sparse_attention(q, k, v, index, count, block_size=64, causal=True, backend="triton")
    rel, cos = _errors(out, ref)
    rel16, _ = _errors(out16, ref)
    print(f"{precision}: rel L2 {rel:.4f}, cosine {cos:.5f}; 16-bit rel L2 {rel16:.4f}")
    assert cos > MIN_COSINE and rel < REL_L2[precision]
    assert rel16 < rel  # the 16-bit kernel stays the more exact one


def test_density_one_matches_dense_attention(device):
    q, k, v = (torch.randn(1, 2, 128, 32, device=device, dtype=torch.bfloat16) for _ in range(3))
    index, count = (t.to(device) for t in mask_to_index(torch.ones(1, 1, 4, 4, dtype=torch.bool, device="cpu")))
    out = block_sparse_attention(q, k, v, index, count, block_size=32, precision="int8")
    dense = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double())
    rel, cos = _errors(out, dense)
    assert rel < REL_L2["int8"] and cos > MIN_COSINE


def test_quantized_tiles_round_trip():
    x = torch.randn(1, 2, 70, 32) * torch.linspace(0.1, 10, 70)[:, None]  # token norms over two decades
    for dtype in (torch.int8, torch.float8_e4m3fn):
        x8, scale = quantize_tiles(x, 1, dtype)
        assert x8.dtype == dtype and scale.shape == (1, 2, 70)
        err = (x8.float() * scale[..., None] - x).abs()
        if dtype == torch.int8:  # a uniform grid: half a step of the token's scale
            bound = 0.5 * scale[..., None].expand_as(x)
        else:  # a float grid: half a step relative to each entry (3 mantissa bits), or of e4m3's subnormals
            bound = torch.maximum(x.abs() / 16, scale[..., None] * 2.0 ** -10)
        assert (err <= bound * 1.001).all()


def test_bad_arguments_raise(device):
    q, k, v = (torch.randn(1, 2, 128, 32, device=device) for _ in range(3))
    index, count = (t.to(device) for t in mask_to_index(torch.ones(1, 1, 2, 2, dtype=torch.bool, device="cpu")))
    with pytest.raises(ValueError, match="precision must be one of"):
        block_sparse_attention(q, k, v, index, count, block_size=64, precision="fp4")
    with pytest.raises(ValueError, match="8-bit Triton or Gluon kernel"):
        block_sparse_attention(q, k, v, index, count, block_size=64, precision="int8", backend="torch")
    with pytest.raises(ValueError, match="repeat_q or live_rows"):
        block_sparse_attention(q, k, v, index, count, block_size=64, precision="int8", repeat_q=2)


def test_methods_take_the_precision_or_say_who_does(device):
    q, k, v = (torch.randn(1, 2, 512, 32, device=device) for _ in range(3))
    exact = make_method("ba_att", min_seq_len=0)(q, k, v)
    eight = make_method("ba_att/precision=int8", min_seq_len=0)(q, k, v)
    rel, cos = _errors(eight, exact)
    assert 0 < rel < REL_L2["int8"] and cos > MIN_COSINE  # the same selection, the 8-bit kernel
    with pytest.raises(ValueError, match="supported by the block-sparse methods"):
        make_method("sparsed/precision=int8")
    with pytest.raises(ValueError, match="precision must be one of"):
        make_method("ba_att/precision=fp8")


def test_methods_fall_back_to_16_bit_where_8_bit_cannot_run(device, caplog):
    """A head dim the 8-bit kernels do not take (Wan-like tiny models: 12): the method warns, counts it and runs
    the 16-bit kernel, the same output as precision bf16; the kernel itself raises."""
    q, k, v = (torch.randn(1, 2, 256, 24, device=device) for _ in range(3))
    exact = make_method("ba_att", min_seq_len=0)(q, k, v)
    method = make_method("ba_att/precision=int8_fp8", min_seq_len=0)
    with caplog.at_level("WARNING"):
        out = method(q, k, v)
    torch.testing.assert_close(out, exact, rtol=0, atol=0)
    assert method.stats["precision_fallbacks"] == 1
    assert "falls back to the 16-bit kernel" in caplog.text and "multiple of 16" in caplog.text
    index, count = (t.to(device) for t in mask_to_index(torch.ones(1, 1, 4, 4, dtype=torch.bool, device="cpu")))
    with pytest.raises(ValueError, match="cannot run here: .*multiple of 16"):
        block_sparse_attention(q, k, v, index, count, block_size=64, precision="int8")


def test_eight_bit_unsupported_names_the_reason(monkeypatch):
    from sparsediff.kernels.block_sparse import eight_bit_unsupported

    q = torch.randn(1, 1, 64, 32, device="cpu")  # CPU tensors: runnable only under the interpreter
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert eight_bit_unsupported(q, 64) is None
    assert "power-of-two block_size" in eight_bit_unsupported(q, 48)
    assert "multiple of 16" in eight_bit_unsupported(torch.randn(1, 1, 64, 40, device="cpu"), 64)
    monkeypatch.delenv("TRITON_INTERPRET")
    assert "CUDA" in eight_bit_unsupported(q, 64)


@pytest.mark.parametrize("rows, dtype", [(1, torch.int8), (1, torch.float8_e4m3fn), (16, torch.float8_e4m3fn),
                                         (16, torch.int8)])
def test_one_pass_quantization_matches_the_pytorch_definition(device, rows, dtype):
    from sparsediff.kernels.block_sparse.quantize import quantize

    gen = torch.Generator().manual_seed(3)
    # 70 tokens (not a multiple of the tile), D 40 (padded to 64 in the kernel), norms over two decades; drawn on
    # the CPU (the CPU generator) whatever the default device, then moved.
    x = (torch.randn(2, 4, 70, 40, generator=gen, device="cpu") * torch.linspace(0.1, 10, 70, device="cpu")[:, None]
         + 0.5).to(device)
    x = x.bfloat16().transpose(1, 2).contiguous().transpose(1, 2)  # strided like a (B, N, H, D) projection
    mean = x.mean(dim=2, dtype=torch.float32)[:, ::2]  # 2 vectors for 4 heads: the GQA mapping h // 2
    want8, want_scale = quantize_tiles(x.float() - mean.repeat_interleave(2, dim=1)[:, :, None], rows, dtype)
    got8, got_scale, dot = quantize(x, rows, dtype, subtract=mean, dot_with=mean)
    assert got8.dtype == dtype and got8.is_contiguous() and got_scale.shape == want_scale.shape
    # Same amax, one division by 127 or 448: a rounding or two apart.
    torch.testing.assert_close(got_scale, want_scale, **tolerance(torch.float32, ulps=ROUNDING))
    diff = (got8.float() - want8.float()).abs()
    # Same grid: INT8 may differ by one step where a value sits on a rounding tie (half away from zero here,
    # half to even in PyTorch) or one float32 ulp from it; e4m3 likewise by one step (1/8 relative).
    step = 1.0 if dtype == torch.int8 else want8.float().abs() / 8 + 2.0 ** -9
    assert (diff <= step).all() and (diff > 0).float().mean() < 0.01
    want_dot = torch.einsum("bhnd,bhd->bhn", x.float(), mean.repeat_interleave(2, dim=1))
    torch.testing.assert_close(dot, want_dot, **tolerance(torch.float32, magnitude=want_dot.abs().max().item()))


def test_quantization_rejects_what_it_does_not_take(device):
    from sparsediff.kernels.block_sparse.quantize import quantize

    x = torch.randn(1, 2, 8, 16, device=device)
    with pytest.raises(TypeError, match="torch.int8 or torch.float8_e4m3fn"):
        quantize(x, 1, torch.float16)
    with pytest.raises(ValueError, match="power of two"):
        quantize(x, 3)
    with pytest.raises(ValueError, match=r"float32 \(B, H', D\)"):
        quantize(x, 1, subtract=torch.zeros(1, 3, 16, device=device))


@pytest.mark.parametrize("pairs", [False, True])
@pytest.mark.parametrize("tile_k", [True, False])
@pytest.mark.parametrize("precision", ["int8", "int8_fp8"])
@pytest.mark.parametrize("d, causal, nk", [(128, False, 1024), (64, True, 1000), (128, True, 777)])
def test_gluon_8bit_on_hopper(d, causal, nk, precision, tile_k, pairs, monkeypatch):
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the Gluon INT8 kernel runs on sm_90 (H100/H200)")
    from sparsediff.kernels.block_sparse import gluon

    # per-block key scales with the softmax on int32 scores (default), or per-token scales
    monkeypatch.setitem(gluon.DEFAULT_SCHEDULE, "int8_tile_k", tile_k)
    monkeypatch.setitem(gluon.DEFAULT_SCHEDULE, "pair_tiles", pairs)  # two key blocks per softmax step
    # GQA 8/2, keys with a shared offset, a ragged tail when nk is not a multiple of 128.
    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(1, 8, nk, d, device="cuda", generator=gen).bfloat16()
    k = (torch.randn(1, 2, nk, d, device="cuda", generator=gen) + 2.0).bfloat16()
    v = torch.randn(1, 2, nk, d, device="cuda", generator=gen).bfloat16()
    index, count = (t.cuda() for t in _index(nk, nk, 128, causal))
    ref, ref_lse = block_sparse_attention_ref(q.double(), k.double(), v.double(), index, count, block_size=128,
                                              causal=causal)
    out, lse = block_sparse_attention(q, k, v, index, count, causal=causal, return_lse=True, precision=precision,
                                      backend="gluon")
    tri, tri_lse = block_sparse_attention(q, k, v, index, count, causal=causal, return_lse=True,
                                          precision=precision, backend="triton")
    rel, cos = _errors(out, ref)
    rel_tri, _ = _errors(tri, ref)
    assert rel < REL_L2[precision] and cos > MIN_COSINE, (rel, cos)
    # The same 8-bit formats (per-block key scales: up to 1.33x the per-token error on SmolLM2's q/k/v, CPU)
    assert rel < 1.5 * rel_tri + 2.0 ** -8, (rel, rel_tri)
    finite = torch.isfinite(ref_lse)
    assert torch.equal(finite.cpu(), torch.isfinite(lse).cpu())
    assert (lse.double() - ref_lse)[finite].abs().max() < 0.05


@pytest.mark.parametrize("precision", ["int8", "int8_fp8"])
def test_gluon_8bit_on_real_captured_qkv(precision, real_qkv, monkeypatch):
    # A real SmolLM2 layer through the Hopper kernel (128-token blocks, causal): both schedules, one and two key
    # blocks per softmax step, meet the 8-bit bounds and stay within a few percent of each other's error.
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the Gluon INT8 kernel runs on sm_90 (H100/H200)")
    from sparsediff.kernels.block_sparse import gluon

    q, k, v = (t.to(torch.bfloat16) for t in real_qkv)
    index, count = (t.to(q.device) for t in _index(q.shape[2], k.shape[2], 128, True, density=0.5))
    ref, _ = block_sparse_attention_ref(q.double(), k.double(), v.double(), index, count, block_size=128,
                                        causal=True)
    errors = {}
    for pairs in (False, True):
        monkeypatch.setitem(gluon.DEFAULT_SCHEDULE, "pair_tiles", pairs)
        out = block_sparse_attention(q, k, v, index, count, causal=True, precision=precision, backend="gluon")
        errors[pairs] = _errors(out, ref)
    out16 = block_sparse_attention(q, k, v, index, count, causal=True, backend="gluon")
    rel16, _ = _errors(out16, ref)
    print(f"{precision}: rel L2 / cosine one block {errors[False]}, pairs {errors[True]}; 16-bit rel L2 {rel16:.4f}")
    for rel, cos in errors.values():
        assert cos > MIN_COSINE and rel < REL_L2[precision] and rel16 < rel
    assert errors[True][0] < 1.1 * errors[False][0] + 2.0 ** -10


def test_gluon_8bit_says_where_it_runs(device):
    if torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0):
        pytest.skip("on sm_90 the Gluon 8-bit kernel applies")
    q = torch.randn(1, 2, 256, 64, device=device).bfloat16()
    index, count = (t.to(device) for t in mask_to_index(torch.ones(1, 1, 2, 2, dtype=torch.bool, device="cpu")))
    with pytest.raises(ValueError, match="backend='gluon' with precision='int8_fp8': needs an sm_90 GPU"):
        block_sparse_attention(q, q, q, index, count, precision="int8_fp8", backend="gluon")
    with pytest.raises(ValueError, match="8-bit Triton or Gluon kernel"):
        block_sparse_attention(q, q, q, index, count, precision="int8", backend="torch")


def test_per_channel_quantization(device):
    from sparsediff.kernels.block_sparse.quantize import quantize

    gen = torch.Generator().manual_seed(4)  # drawn on the CPU whatever the default device, then moved
    x = (torch.randn(1, 2, 70, 48, generator=gen, device="cpu") * torch.linspace(0.1, 10, 48, device="cpu")).to(
        device).bfloat16()
    x8, scale, _ = quantize(x, 32, torch.float8_e4m3fn, per_channel=True)
    want_scale = x.float().abs().amax(dim=2) / 448
    assert scale.shape == (1, 2, 48)
    torch.testing.assert_close(scale, want_scale, **tolerance(torch.float32, ulps=ROUNDING))
    # Every entry within half an e4m3 step (3 mantissa bits) of its channel-scaled value, or of the subnormal step.
    err = (x8.float() * scale[:, :, None, :] - x.float()).abs()
    bound = torch.maximum(x.float().abs() / 16, scale[:, :, None, :] * 2.0 ** -10)
    assert (err <= bound * 1.001).all()


def test_transposed_quantization_is_the_transpose(device):
    from sparsediff.kernels.block_sparse.quantize import quantize

    x = torch.randn(1, 2, 70, 32, device=device).bfloat16()  # 70 tokens: rows padded to 80 for TMA
    flat, flat_scale, _ = quantize(x, 32, torch.float8_e4m3fn, per_channel=True)
    xt, scale, _ = quantize(x, 32, torch.float8_e4m3fn, per_channel=True, transpose=True)
    assert xt.shape == (1, 2, 32, 70) and xt.stride(-1) == 1 and xt.stride(-2) == 80
    assert torch.equal(xt.float(), flat.float().transpose(-1, -2)) and torch.equal(scale, flat_scale)


def test_per_channel_scales_refuse_a_subtracted_mean(device):
    from sparsediff.kernels.block_sparse.quantize import quantize

    x = torch.randn(1, 2, 8, 16, device=device)
    with pytest.raises(ValueError, match="per_channel scales are taken before subtract"):
        quantize(x, 1, torch.float8_e4m3fn, per_channel=True, subtract=torch.zeros(1, 2, 16, device=device))
