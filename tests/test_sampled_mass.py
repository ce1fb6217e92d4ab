"""Block mass from sampled query rows (the default BA-Att estimator): Triton (interpreter on CPU) and
PyTorch paths vs the float64 reference, on random and structured inputs and on real captured q/k."""

import math

import pytest
import torch

from sparsediff.kernels.sampled_mass import sampled_block_mass, sampled_block_mass_ref, sampled_rows
from sparsediff.kernels.tile_mass import tile_mass_ref
from sparsediff.testing.tolerance import ROUNDING, assert_close_as_pytorch, tolerance

BACKENDS = ["torch", "triton"]
CASES = [
    # b, hq, hkv, nq, nk, d, block, rows, causal
    (1, 2, 2, 64, 64, 32, 16, 4, False),
    (2, 4, 2, 96, 96, 64, 32, 4, True),  # GQA + causal
    (1, 3, 1, 50, 130, 32, 16, 2, False),  # MQA, Nq != Nk, ragged tails
    (1, 2, 1, 40, 100, 32, 16, 8, True),  # causal end-aligned with a prefix
    (1, 2, 2, 33, 33, 24, 16, 1, True),  # head dim not a power of two, one row per block
]


def pytorch_mass(q, k, *, block_size, rows, causal):
    """The estimate by plain PyTorch with the matmul in the inputs' dtype and the softmax in float32 (float64
    for float64 inputs): float64 gives the reference, the inputs' dtype the baseline."""
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    scale = 1.0 / math.sqrt(q.shape[-1])
    pos = sampled_rows(q.shape[2], block_size, rows, q.device).flatten()
    group = q.shape[1] // k.shape[1]
    s = (q[:, :, pos] @ k.repeat_interleave(group, 1).transpose(-1, -2)).to(acc) * scale
    nk, nq, nkb = k.shape[2], q.shape[2], math.ceil(k.shape[2] / block_size)
    if causal:
        s = s.masked_fill(torch.arange(nk, device=q.device)[None, :] > pos[:, None] + nk - nq, float("-inf"))
    p = torch.nn.functional.pad(torch.softmax(s, -1).nan_to_num(0.0), (0, nkb * block_size - nk))
    return p.view(*p.shape[:2], -1, rows, nkb, block_size).sum(-1).mean(-2)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_reference_on_random_inputs(backend, case, dtype, device):
    b, hq, hkv, nq, nk, d, bs, rows, causal = case
    q = torch.randn(b, hq, nq, d, device=device).mul(2).to(dtype)  # sharper than unit scores
    k = torch.randn(b, hkv, nk, d, device=device).to(dtype)
    kw = dict(block_size=bs, rows=rows, causal=causal)
    got = sampled_block_mass(q, k, backend=backend, **kw)
    ref = sampled_block_mass_ref(q.double(), k.double(), **kw)
    assert got.dtype == torch.float32 and got.shape == ref.shape
    assert torch.isfinite(got).all()
    assert_close_as_pytorch(got, lambda q, k: pytorch_mass(q, k, **kw), q, k)
    # Every row of the estimate is a distribution over the key blocks its sampled rows see (float32 sums).
    sees = ref.sum(-1) > 0
    torch.testing.assert_close(got.sum(-1)[sees], torch.ones_like(got.sum(-1)[sees]),
                               **tolerance(torch.float32, ulps=ROUNDING))


def test_sampled_rows_spread_through_each_block():
    pos = sampled_rows(100, 32, 4)
    assert pos.tolist() == [[7, 15, 23, 31], [39, 47, 55, 63], [71, 79, 87, 95], [96, 97, 98, 99]]
    assert sampled_rows(64, 16, 16).flatten().tolist() == list(range(64))


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_rows_sampled_equals_the_exact_block_oracle(backend, device):
    """With every row sampled, the estimate is the oracle's mean probability times the key block's size."""
    q, k = torch.randn(1, 2, 64, 32, device=device), torch.randn(1, 2, 64, 32, device=device)
    got = sampled_block_mass(q, k, block_size=16, rows=16, causal=True, backend=backend)
    oracle = tile_mass_ref(q, k, causal=True, block_size=16) * 16
    torch.testing.assert_close(got, oracle, **tolerance(torch.float32, ulps=ROUNDING))


@pytest.mark.parametrize("backend", BACKENDS)
def test_finds_a_planted_key(backend, device):
    """One key that every query matches strongly: its block gets almost all the mass from every query block
    that sees it, although the key is 1 of 32 in its block."""
    d, n = 32, 128
    q = torch.randn(1, 1, n, d, device=device) * 0.1
    k = torch.randn(1, 1, n, d, device=device) * 0.1
    direction = torch.randn(d, device=device)
    q += direction
    k[0, 0, 70] = direction * 3
    got = sampled_block_mass(q, k, block_size=32, rows=2, causal=True, backend=backend)
    assert (got[0, 0, 2:, 2] > 0.9).all()
    assert (got[0, 0, :2, 2] == 0).all()  # the causal mask hides it from earlier query blocks


def test_on_real_captured_qk(real_qkv):
    q, k, _ = real_qkv
    q, k = q[..., :512, :], k[..., :512, :]
    for backend in BACKENDS:
        got = sampled_block_mass(q, k, block_size=64, rows=4, causal=True, backend=backend)
        assert_close_as_pytorch(got, lambda q, k: pytorch_mass(q, k, block_size=64, rows=4, causal=True), q, k)


@pytest.mark.parametrize("bad", [dict(rows=0), dict(rows=65), dict(rows=2.0), dict(block_size=48)])
def test_bad_arguments_raise(bad):
    q = torch.randn(1, 2, 64, 32)
    kw = dict(block_size=64, rows=4) | bad
    with pytest.raises(ValueError, match="rows|block_size"):
        sampled_block_mass(q, q, **kw)


def test_triton_needs_power_of_two_rows():
    q = torch.randn(1, 1, 64, 32)
    with pytest.raises(ValueError, match="power-of-two"):
        sampled_block_mass(q, q, block_size=32, rows=3, backend="triton")


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("splits", [2, 3])
def test_key_split_launch_matches_the_one_pass_kernel(case, splits, device):
    """Key blocks spread over several programs (``LAUNCH['key_splits']``) plus the reduce launch give the
    one-program result, causal blocks past a row's end included."""
    from sparsediff.kernels import sampled_mass as sm

    b, hq, hkv, nq, nk, d, bs, rows, causal = case
    if rows & (rows - 1):
        pytest.skip("the Triton path takes a power-of-two number of rows")
    q = torch.randn(b, hq, nq, d, device=device).mul(2)
    k = torch.randn(b, hkv, nk, d, device=device)
    kw = dict(block_size=bs, rows=rows, scale=d ** -0.5, causal=causal)
    one = sm._mass_triton(q, k, **kw)
    split = sm._mass_triton(q, k, **kw, launch=dict(key_splits=splits))
    torch.testing.assert_close(split, one, **tolerance(torch.float32, ulps=ROUNDING))  # partial sums merged
    assert_close_as_pytorch(split, lambda q, k: pytorch_mass(q, k, block_size=bs, rows=rows, causal=causal), q, k)


def test_automatic_key_splits():
    """About four programs per SM from the key side when the query side gives fewer, never below 16 key blocks
    a split; none on CPU."""
    from sparsediff.kernels.sampled_mass import auto_key_splits

    # H100 (132 SMs), 16 heads, 4 rows per 128-token block, 128 rows a program: 16k / 32k / 64k tokens
    assert [auto_key_splits(p, nkb, 132) for p, nkb in ((64, 128), (128, 256), (256, 512))] == [8, 4, 2]
    assert auto_key_splits(8, 64, 132) == 4  # short sequences: capped by 16 key blocks per split
    assert auto_key_splits(4096, 512, 132) == 1  # enough programs already
    assert auto_key_splits(8, 512, 0) == 1  # CPU


def test_automatic_split_launch_matches(monkeypatch, device):
    """The automatic split, as a 132-SM GPU would choose it, gives the one-program result (causal included)."""
    from sparsediff.kernels import sampled_mass as sm

    monkeypatch.setattr(sm, "_sms", lambda x: 132)
    q = torch.randn(1, 2, 1100, 32, device=device)
    k = torch.randn(1, 2, 1100, 32, device=device)
    for causal in (False, True):
        kw = dict(block_size=32, rows=4, scale=32 ** -0.5, causal=causal)
        one = sm._mass_triton(q, k, **kw, launch=dict(key_splits=1))
        auto = sm._mass_triton(q, k, **kw)
        torch.testing.assert_close(auto, one, **tolerance(torch.float32, ulps=ROUNDING))
