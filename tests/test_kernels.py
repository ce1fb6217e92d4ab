"""Block-sparse attention (Triton under the interpreter on CPU, and the PyTorch path) vs references."""

import math

import pytest
import torch
import torch.nn.functional as F

from sparsediff.kernels import block_sparse_attention, dense_index, index_to_mask, mask_to_index
from sparsediff.kernels.block_sparse.reference import (
    block_sparse_attention_ref,
    causal_token_mask,
    masked_attention_ref,
)
from sparsediff.testing.tolerance import REDUCTION, assert_within_baseline, tolerance

BACKENDS = ["torch", "triton"]


def make_qkv(b, hq, hkv, nq, nk, d, dtype, device=None):
    q = torch.randn(b, hq, nq, d, dtype=dtype, device=device)
    k = torch.randn(b, hkv, nk, d, dtype=dtype, device=device)
    v = torch.randn(b, hkv, nk, d, dtype=dtype, device=device)
    return q, k, v


def random_mask(b, h, nqb, nkb, density, generator=None):
    return torch.rand(b, h, nqb, nkb, generator=generator) < density


def low_precision_lse_tolerance(ref_lse):
    """atol/rtol for a float32 LSE computed from float16/bfloat16 inputs, against float64. The inputs are exact
    in float32, so float32's epsilon at the LSE's size sets the scale; the torch path (PyTorch's fused CPU
    attention, whose exp is approximate) loses up to ~128 of them, so twice that. An LSE from scores rounded to
    the inputs' dtype, PyTorch's low-precision baseline, would be a far looser yardstick (~1e-2 for bfloat16)."""
    size = ref_lse[torch.isfinite(ref_lse)].abs().max().item()
    return tolerance(torch.float32, ulps=2 * REDUCTION, magnitude=size)


def assert_close_to_reference(out, lse, q, k, v, index, count, causal, block_size):
    ref_out, ref_lse = block_sparse_attention_ref(
        q.double(), k.double(), v.double(), index, count, causal=causal, block_size=block_size
    )
    assert out.dtype == q.dtype and out.shape == q.shape
    assert torch.isfinite(out).all()
    if q.dtype == torch.float64:  # nothing lower to compare with: the same float64 math in another order
        torch.testing.assert_close(out, ref_out, **tolerance(torch.float64))
    else:  # PyTorch's own error in q's dtype is the yardstick
        lowp, _ = block_sparse_attention_ref(q, k, v, index, count, causal=causal, block_size=block_size,
                                             upcast=False)
        assert_within_baseline(out, ref_out, lowp, what="out")
    if lse is not None:
        assert lse.dtype == torch.float32 and lse.shape == q.shape[:3]
        empty = torch.isneginf(ref_lse)
        assert torch.equal(torch.isneginf(lse), empty)
        if q.dtype == torch.float64:  # a float64 LSE rounded once to float32
            torch.testing.assert_close(lse.double(), ref_lse, **tolerance(torch.float32, ulps=1))
        elif q.dtype == torch.float32:  # by PyTorch's float32 error
            lse32 = block_sparse_attention_ref(q, k, v, index, count, causal=causal, block_size=block_size)[1]
            assert_within_baseline(lse, ref_lse, lse32, what="lse")
        else:
            torch.testing.assert_close(lse.double(), ref_lse, **low_precision_lse_tolerance(ref_lse))
        assert (out[empty] == 0).all()


CASES = [
    # b, hq, hkv, nq, nk, d, block, causal
    (1, 2, 2, 64, 64, 64, 32, False),
    (2, 4, 2, 96, 96, 128, 32, True),  # GQA + causal
    (1, 4, 1, 50, 130, 64, 32, False),  # MQA, Nq != Nk, ragged tails
    (1, 2, 1, 40, 100, 64, 16, True),  # causal end-aligned with a prefix
    (1, 2, 2, 33, 33, 32, 16, True),
    (1, 2, 2, 48, 70, 80, 16, False),  # head dim not a power of two
    (1, 2, 2, 48, 48, 96, 16, True),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_matches_reference_low_precision(backend, dtype, case):
    b, hq, hkv, nq, nk, d, block, causal = case
    q, k, v = make_qkv(b, hq, hkv, nq, nk, d, dtype)
    mask = random_mask(b, hq, math.ceil(nq / block), math.ceil(nk / block), 0.6)
    index, count = mask_to_index(mask)
    out, lse = block_sparse_attention(
        q, k, v, index, count, causal=causal, block_size=block, return_lse=True, backend=backend
    )
    assert_close_to_reference(out, lse, q, k, v, index, count, causal, block)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_torch_path_matches_reference_full_precision(dtype, case):
    b, hq, hkv, nq, nk, d, block, causal = case
    q, k, v = make_qkv(b, hq, hkv, nq, nk, d, dtype)
    mask = random_mask(b, hq, math.ceil(nq / block), math.ceil(nk / block), 0.5)
    index, count = mask_to_index(mask)
    out, lse = block_sparse_attention(q, k, v, index, count, causal=causal, block_size=block, return_lse=True)
    assert_close_to_reference(out, lse, q, k, v, index, count, causal, block)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", [False, True])
def test_density_one_equals_sdpa(backend, causal):
    q, k, v = make_qkv(1, 4, 2, 100, 100, 64, torch.float16)
    index, count = dense_index(1, 1, 4, 4)
    out = block_sparse_attention(q, k, v, index, count, causal=causal, block_size=32, backend=backend)
    expected = F.scaled_dot_product_attention(
        q.float(), k.float().repeat_interleave(2, 1), v.float().repeat_interleave(2, 1), is_causal=causal
    )
    everything = causal_token_mask(100, 100) if causal else torch.ones(1, dtype=torch.bool)
    assert_within_baseline(out, expected, masked_attention_ref(q, k, v, everything, upcast=False)[0])


def test_density_one_equals_sdpa_float32():
    q, k, v = make_qkv(2, 2, 2, 130, 130, 64, torch.float32)
    index, count = dense_index(2, 2, 3, 3)
    out = block_sparse_attention(q, k, v, index, count, block_size=64)
    assert_within_baseline(out, F.scaled_dot_product_attention(q.double(), k.double(), v.double()),
                           F.scaled_dot_product_attention(q, k, v))


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_rows_give_zeros_and_neg_inf_lse(backend):
    q, k, v = make_qkv(1, 2, 2, 64, 64, 64, torch.float16)
    mask = torch.ones(1, 2, 2, 2, dtype=torch.bool)
    mask[0, 1, 0] = False  # head 1, query block 0 keeps nothing
    index, count = mask_to_index(mask)
    out, lse = block_sparse_attention(q, k, v, index, count, block_size=32, return_lse=True, backend=backend)
    assert (out[0, 1, :32] == 0).all() and torch.isneginf(lse[0, 1, :32]).all()
    assert torch.isfinite(lse[0, 0]).all() and torch.isfinite(lse[0, 1, 32:]).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_structured_masks(backend):
    """Local window + sinks + a vertical stripe: the kernel must read exactly those blocks."""
    nb, block = 6, 16
    n = nb * block
    q, k, v = make_qkv(1, 3, 3, n, n, 64, torch.float16)
    i = torch.arange(nb)
    local = (i[:, None] - i[None, :]).abs() <= 1
    sinks = torch.zeros(nb, nb, dtype=torch.bool)
    sinks[:, 0] = True
    stripe = torch.zeros(nb, nb, dtype=torch.bool)
    stripe[:, 4] = True
    mask = torch.stack([local, local | sinks, local | sinks | stripe])[None]
    index, count = mask_to_index(mask)
    out, lse = block_sparse_attention(q, k, v, index, count, block_size=block, return_lse=True, backend=backend)
    assert_close_to_reference(out, lse, q, k, v, index, count, False, block)
    # Different heads saw different key sets, so their outputs differ from the all-local answer.
    local_only, _ = mask_to_index(local.expand(1, 3, nb, nb).contiguous())
    out_local = block_sparse_attention(q, k, v, local_only, _, block_size=block, backend=backend)
    assert torch.equal(out[0, 0], out_local[0, 0])
    # 1e-2: ten float16 epsilons at |out| ~ 1, so the difference is not rounding.
    assert not torch.allclose(out[0, 2].float(), out_local[0, 2].float(), atol=1e-2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_broadcast_index_over_batch_and_heads(backend):
    q, k, v = make_qkv(2, 4, 2, 64, 64, 64, torch.bfloat16)
    mask = random_mask(1, 1, 2, 2, 0.7)
    mask[..., 0] = True
    index, count = mask_to_index(mask)
    out = block_sparse_attention(q, k, v, index, count, block_size=32, backend=backend)
    full_index, full_count = index.expand(2, 4, 2, -1).contiguous(), count.expand(2, 4, 2).contiguous()
    expected = block_sparse_attention(q, k, v, full_index, full_count, block_size=32, backend=backend)
    assert torch.equal(out, expected)


def test_mask_index_round_trip():
    mask = random_mask(2, 3, 5, 7, 0.4)
    index, count = mask_to_index(mask)
    assert index.dtype == torch.int32 and count.dtype == torch.int32
    assert torch.equal(index_to_mask(index, count, 7), mask)
    assert torch.equal(count, mask.sum(-1).int())
    # Kept ids are ascending within each row.
    for row, c in zip(index.view(-1, index.shape[-1]), count.view(-1)):
        ids = row[: int(c)]
        assert torch.all(ids[1:] > ids[:-1])


def test_torch_path_never_materialises_full_scores(monkeypatch):
    """The chunked path must work with a tiny chunk budget (one query block at a time)."""
    import sparsediff.kernels.block_sparse.pytorch as bst

    monkeypatch.setattr(bst, "_CHUNK_BYTES", 1)
    q, k, v = make_qkv(1, 2, 2, 100, 100, 32, torch.float32)
    mask = random_mask(1, 2, 4, 4, 0.5)
    index, count = mask_to_index(mask)
    out, lse = block_sparse_attention(q, k, v, index, count, block_size=32, return_lse=True)
    assert_close_to_reference(out, lse, q, k, v, index, count, False, 32)


def test_masked_attention_reference_against_sdpa():
    q, k, v = make_qkv(1, 2, 2, 20, 30, 16, torch.float64)
    mask = torch.rand(1, 2, 20, 30) < 0.7
    mask[..., 0] = True
    out, _ = masked_attention_ref(q, k, v, mask)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, attn_mask=mask), **tolerance(q.dtype))
