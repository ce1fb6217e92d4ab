"""Dropped key blocks as pooled softmax terms (``compensate=True``): Triton (interpreter on CPU) and PyTorch
paths vs the float64 reference, on random inputs and real captured q/k/v."""

import math

import pytest
import torch
from test_kernels import low_precision_lse_tolerance

from sparsediff.kernels import block_sparse_attention, mask_to_index
from sparsediff.kernels.block_sparse.reference import block_sparse_attention_ref
from sparsediff.kernels.dropped_blocks import add_dropped_blocks, dropped_block_attention_ref
from sparsediff.kernels.masks import causal_block_mask
from sparsediff.kernels.merge import merge_attention
from sparsediff.kernels.merge.reference import merge_attention_ref
from sparsediff.testing.tolerance import ROUNDING, assert_within_baseline, tolerance

CASES = [
    # b, hq, hkv, nq, nk, d, block, causal
    (1, 2, 2, 64, 64, 32, 16, False),
    (2, 4, 2, 96, 96, 64, 32, True),
    (1, 3, 1, 50, 130, 32, 16, False),
    (1, 2, 1, 40, 100, 24, 16, True),
]


def _random_index(b, h, nq, nk, bs, causal, density=0.4):
    nqb, nkb = math.ceil(nq / bs), math.ceil(nk / bs)
    mask = torch.rand(b, h, nqb, nkb) < density
    mask[..., 0] = True
    if causal:
        vis = causal_block_mask(nqb, nkb, nq, nk, bs)
        mask &= vis
        diag = vis.cumsum(-1) == vis.sum(-1, keepdim=True)  # the last visible block of each row
        mask |= diag & vis
    return mask_to_index(mask)


def _expected(q, k, v, index, count, bs, causal):
    """Merge of the float64 block-sparse reference and the float64 pooled-term reference."""
    out_s, lse_s = block_sparse_attention_ref(q.double(), k.double(), v.double(), index, count, causal=causal,
                                              block_size=bs)
    out_p, lse_p = dropped_block_attention_ref(q, k, v, index, count, causal=causal, block_size=bs)
    return merge_attention(out_s, lse_s, out_p, lse_p, backend="torch")


def _baseline(q, k, v, index, count, bs, causal):
    """The same merge with the block-sparse part by PyTorch in the inputs' own dtype (its output rounded to it)."""
    out_s, lse_s = block_sparse_attention_ref(q, k, v, index, count, causal=causal, block_size=bs, upcast=False)
    out_p, lse_p = dropped_block_attention_ref(q, k, v, index, count, causal=causal, block_size=bs)
    return merge_attention_ref(out_s, lse_s, out_p, lse_p)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_reference(backend, case, dtype, device):
    b, hq, hkv, nq, nk, d, bs, causal = case
    q, k, v = (torch.randn(b, h, n, d, device=device).to(dtype) for h, n in ((hq, nq), (hkv, nk), (hkv, nk)))
    index, count = (t.to(device) for t in _random_index(b, hq, nq, nk, bs, causal))
    out, lse = block_sparse_attention(q, k, v, index, count, causal=causal, block_size=bs, return_lse=True)
    got, got_lse = add_dropped_blocks(q, k, v, index, count, out, lse, causal=causal, block_size=bs,
                                      backend=backend)
    ref, ref_lse = _expected(q.cpu(), k.cpu(), v.cpu(), index.cpu(), count.cpu(), bs, causal)
    assert got.dtype == dtype and got_lse.dtype == torch.float32
    # The sparse output's own error, which the merge carries along: PyTorch's in the inputs' dtype.
    base, base_lse = _baseline(q.cpu(), k.cpu(), v.cpu(), index.cpu(), count.cpu(), bs, causal)
    assert_within_baseline(got.cpu(), ref, base, what="out")
    if dtype == torch.float32:
        assert_within_baseline(got_lse.cpu(), ref_lse, base_lse, what="lse")
    else:
        torch.testing.assert_close(got_lse.cpu().double(), ref_lse.double(), **low_precision_lse_tolerance(ref_lse))
    # Something was added: the pooled terms raise every row's LSE that has a dropped, visible block (the merge's
    # exp and log may round it down by an epsilon each, at its size).
    slack = tolerance(torch.float32, ulps=2, magnitude=lse[torch.isfinite(lse)].abs().max().item())["atol"]
    assert bool((got_lse >= lse - slack).all())


def test_keep_everything_adds_nothing(device):
    q, k, v = (torch.randn(1, 2, 64, 32, device=device) for _ in range(3))
    index, count = mask_to_index(torch.ones(1, 2, 4, 4, dtype=torch.bool, device=device))
    out, lse = block_sparse_attention(q, k, v, index, count, block_size=16, return_lse=True)
    for backend in ("torch", "triton"):
        got, got_lse = add_dropped_blocks(q, k, v, index, count, out, lse, block_size=16, backend=backend)
        torch.testing.assert_close((got, got_lse), (out, lse), **tolerance(torch.float32, ulps=ROUNDING))


def test_on_real_captured_qkv(real_qkv):
    q, k, v = (t[..., :512, :] for t in real_qkv)
    index, count = _random_index(1, q.shape[1], 512, 512, 64, True, density=0.3)
    index, count = index.to(q.device), count.to(q.device)
    out, lse = block_sparse_attention(q, k, v, index, count, causal=True, block_size=64, return_lse=True)
    ref, _ = _expected(q.cpu(), k.cpu(), v.cpu(), index.cpu(), count.cpu(), 64, True)
    base, _ = _baseline(q.cpu(), k.cpu(), v.cpu(), index.cpu(), count.cpu(), 64, True)
    for backend in ("torch", "triton"):
        got, _ = add_dropped_blocks(q, k, v, index, count, out, lse, causal=True, block_size=64, backend=backend)
        assert_within_baseline(got.cpu(), ref, base, what=backend)
