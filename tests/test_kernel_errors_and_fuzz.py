"""Bad input gets a clear error; a seeded fuzz over shapes and densities; block stats and LSE merge."""

import math
import os

import pytest
import torch

from sparsediff.kernels import block_sparse_attention, block_stats, mask_to_index, merge_attention
from sparsediff.kernels.block_sparse.reference import block_sparse_attention_ref
from sparsediff.kernels.block_stats.reference import block_stats_ref
from sparsediff.kernels.merge.reference import merge_attention_ref
from sparsediff.testing.tolerance import ROUNDING, assert_within_baseline, tolerance


def qkv(dtype=torch.float16, n=64, d=64):
    return [torch.randn(1, 2, n, d, dtype=dtype) for _ in range(3)]


def full_index(nqb=2, nkb=2):
    return mask_to_index(torch.ones(1, 2, nqb, nkb, dtype=torch.bool))


@pytest.mark.parametrize(
    "mutate, error, words",
    [
        (lambda a: {**a, "q": a["q"][0]}, ValueError, "(B, H, N, D)"),
        (lambda a: {**a, "k": a["k"].float(), "v": a["v"].float()}, TypeError, "share a dtype"),
        (lambda a: {**a, "v": a["v"][:, :, :32]}, ValueError, "same shape"),
        (lambda a: {**a, "block_count": a["block_count"].float()}, TypeError, "integer tensor"),
        (lambda a: {**a, "block_index": a["block_index"].float()}, TypeError, "integer tensor"),
        (lambda a: {**a, "block_index": a["block_index"] + 5}, ValueError, "outside [0, 2)"),
        (lambda a: {**a, "block_index": a["block_index"] - 1}, ValueError, "outside"),
        (lambda a: {**a, "block_count": a["block_count"] + 1}, ValueError, "block_count values"),
        (lambda a: {**a, "block_count": a["block_count"][..., :1]}, ValueError, "ceil(Nq/block_size)=2"),
        (lambda a: {**a, "block_index": a["block_index"].to("meta")}, ValueError, "one device"),
    ],
)
def test_bad_input_raises_clear_error(mutate, error, words):
    q, k, v = qkv()
    index, count = full_index()
    args = mutate(dict(q=q, k=k, v=v, block_index=index, block_count=count))
    with pytest.raises(error, match=__import__("re").escape(words)):
        block_sparse_attention(args.pop("q"), args.pop("k"), args.pop("v"), args.pop("block_index"),
                               args.pop("block_count"), block_size=32)


def test_gqa_heads_must_divide():
    q = torch.randn(1, 3, 32, 64, dtype=torch.float16)
    k = torch.randn(1, 2, 32, 64, dtype=torch.float16)
    index, count = mask_to_index(torch.ones(1, 3, 1, 1, dtype=torch.bool))
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        block_sparse_attention(q, k, k, index, count, block_size=32)


def test_triton_rejects_float32_and_odd_head_dims():
    index, count = full_index()
    q, k, v = qkv(torch.float32)
    with pytest.raises(TypeError, match="supports dtypes"):
        block_sparse_attention(q, k, v, index, count, block_size=32, backend="triton")
    q, k, v = qkv(torch.float16, d=300)
    with pytest.raises(ValueError, match="head dims"):
        block_sparse_attention(q, k, v, index, count, block_size=32, backend="triton")
    q, k, v = qkv(torch.float16)
    with pytest.raises(ValueError, match="power-of-two block_size"):
        block_sparse_attention(q, k, v, *mask_to_index(torch.ones(1, 2, 2, 2, dtype=torch.bool)),
                               block_size=48, backend="triton")
    with pytest.raises(ValueError, match="backend must be"):
        block_sparse_attention(q, k, v, index, count, block_size=32, backend="cuda")


def _fuzz(cases, seed):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(cases):
        pick = lambda *xs: xs[int(torch.randint(len(xs), (1,), generator=gen, device="cpu"))]
        block = pick(16, 32)
        hkv = pick(1, 2)
        hq = hkv * pick(1, 2)
        nq, nk = (int(torch.randint(1, 100, (1,), generator=gen, device="cpu")) for _ in range(2))
        causal = pick(False, True)
        if causal:
            nk = max(nk, nq)
        d = pick(32, 64)
        density = pick(0.0, 0.3, 0.7, 1.0)
        dtype = pick(torch.float16, torch.bfloat16)
        backend = pick("torch", "triton")
        # Drawn on the CPU generator, then moved to the default device (the GPU under SPARSEDIFF_TEST_DEVICE).
        here = torch.get_default_device()
        q = torch.randn(1, hq, nq, d, generator=gen, device="cpu").to(here, dtype)
        k = torch.randn(1, hkv, nk, d, generator=gen, device="cpu").to(here, dtype)
        v = torch.randn(1, hkv, nk, d, generator=gen, device="cpu").to(here, dtype)
        mask = torch.rand(1, hq, math.ceil(nq / block), math.ceil(nk / block), generator=gen, device="cpu") < density
        mask = mask.to(here)
        index, count = mask_to_index(mask)
        out, lse = block_sparse_attention(q, k, v, index, count, causal=causal, block_size=block,
                                          return_lse=True, backend=backend)
        ref, ref_lse = block_sparse_attention_ref(q.double(), k.double(), v.double(), index, count,
                                                  causal=causal, block_size=block)
        lowp, _ = block_sparse_attention_ref(q, k, v, index, count, causal=causal, block_size=block, upcast=False)
        desc = f"{backend} {dtype} hq={hq} hkv={hkv} nq={nq} nk={nk} d={d} block={block} causal={causal}"
        assert_within_baseline(out, ref, lowp, what=desc)
        assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse)), desc


def test_fuzz_small():
    _fuzz(cases=12, seed=1234)


@pytest.mark.skipif(not os.environ.get("SPARSEDIFF_BIG_FUZZ"), reason="set SPARSEDIFF_BIG_FUZZ=N to run N cases")
def test_fuzz_big():
    _fuzz(cases=int(os.environ["SPARSEDIFF_BIG_FUZZ"]), seed=int.from_bytes(os.urandom(2), "little"))


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("n, d, block", [(128, 64, 32), (100, 80, 32), (17, 32, 16)])
def test_block_stats_matches_reference(backend, n, d, block):
    x = torch.randn(2, 3, n, d) * 2 + 0.5
    stats = block_stats(x.half(), block, backend=backend)
    # float16 inputs, float32 statistics against float64 ones rounded to float32: a few roundings apart.
    for got, want in zip(stats[:3], block_stats_ref(x.half(), block)):
        torch.testing.assert_close(got, want, **tolerance(torch.float32, ulps=ROUNDING))
    assert stats.count.tolist() == [min(block, n - j * block) for j in range(math.ceil(n / block))]


def test_block_stats_separates_structured_blocks():
    """A block of constant tokens has zero variance; a noisy block does not."""
    x = torch.randn(1, 1, 64, 16)
    x[:, :, :32] = 3.0
    stats = block_stats(x, 32)
    # Zero up to one rounding of x^2 = 9 (a one-pass variance cancels there); 0.5: far from zero.
    assert stats.var[0, 0, 0].abs().max() <= tolerance(torch.float32, ulps=1, magnitude=9.0)["atol"]
    assert stats.var[0, 0, 1].mean() > 0.5
    assert torch.equal(stats.mean[0, 0, 0], torch.full((16,), 3.0))  # sums of 3.0 are exact in float32


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_merge_of_disjoint_halves_equals_full_attention(backend):
    q, k, v = (torch.randn(1, 2, 64, 32, dtype=torch.float32) for _ in range(3))
    mask = torch.ones(1, 2, 2, 2, dtype=torch.bool)
    left, right = mask.clone(), mask.clone()
    left[..., 1] = False
    right[..., 0] = False
    left[0, 0, 0] = False  # one side empty for some rows: lse = -inf must merge cleanly
    out_a, lse_a = block_sparse_attention(q, k, v, *mask_to_index(left), block_size=32, return_lse=True)
    out_b, lse_b = block_sparse_attention(q, k, v, *mask_to_index(right), block_size=32, return_lse=True)
    out, lse = merge_attention(out_a.half(), lse_a, out_b.half(), lse_b, backend=backend)
    union = left | right
    ref, ref_lse = block_sparse_attention_ref(q.double(), k.double(), v.double(), *mask_to_index(union), block_size=32)
    assert out.dtype == torch.float16
    # Halves rounded to float16, merged in float32, rounded to float16: float16's own error, at the output's size.
    fp16_tol = tolerance(torch.float16, magnitude=ref.abs().max().item())["atol"]
    assert (out.double() - ref).abs().max() <= fp16_tol
    torch.testing.assert_close(lse.double(), ref_lse, **tolerance(torch.float32, ulps=ROUNDING))  # float32 LSEs
    ref_merge, _ = merge_attention_ref(out_a, lse_a, out_b, lse_b)
    assert (out.float() - ref_merge).abs().max() <= fp16_tol


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_merge_both_empty_gives_zeros(backend):
    out_a = torch.randn(1, 1, 4, 16)
    lse = torch.full((1, 1, 4), float("-inf"))
    out, merged = merge_attention(out_a, lse, out_a, lse, backend=backend)
    assert (out == 0).all() and torch.isneginf(merged).all()


def test_merge_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="same shape"):
        merge_attention(torch.zeros(1, 4, 8), torch.zeros(1, 4), torch.zeros(1, 5, 8), torch.zeros(1, 5))
