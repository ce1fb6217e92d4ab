"""The state a LoSA block's first step writes from the prefix length on the device (``methods.losa.step_kernels``):
``step_lengths`` and ``prefix_block_means``, each kernel against its PyTorch path and against the values
spelled out from their definition."""

import math

import pytest
import torch

from sparsediff.methods.losa.step_kernels import prefix_block_means, split_means, step_lengths
from sparsediff.testing.tolerance import assert_within_baseline, tolerance

# Three bfloat16 parts hold float32's 24 significant bits: their sum is the float32 mean up to one rounding.
PARTS_TOL = tolerance(torch.float32, ulps=1, magnitude=0.0)


def _dev():
    return torch.get_default_device()  # the GPU under SPARSEDIFF_TEST_DEVICE=cuda


def _lengths_state(nkb_cap, splits, tiles, dsplits, w, seed=0):
    gen = torch.Generator().manual_seed(seed)
    dev = _dev()
    tables = [torch.randint(0, 50, (nkb_cap + 1, s), generator=gen, device="cpu").to(dev, torch.int32)
              for s in (splits, dsplits)]
    # Outputs start as garbage: every element must be written.
    outs = dict(bias=torch.full((nkb_cap,), 7.0, device=dev), count=torch.full((1, 1, splits), -3, dtype=torch.int32,
                                                                                device=dev),
                count_tiles=torch.full((1, 1, splits * tiles), -3, dtype=torch.int32, device=dev),
                dense_count=torch.full((1, 1, dsplits), -3, dtype=torch.int32, device=dev),
                win_idx=torch.full((w,), -9, dtype=torch.int64, device=dev),
                win_bias=torch.full((w,), 3.0, device=dev))
    return tables, outs


@pytest.mark.parametrize("n_prefix", [0, 100, 128, 1000, 1300])
@pytest.mark.parametrize("splits,tiles", [(1, 1), (5, 3)])
def test_step_lengths_kernel_writes_the_definition(n_prefix, splits, tiles):
    bs, nq, nkb_cap, dsplits = 128, 40, 11, 4
    w = bs + nq
    (count_table, dense_table), _ = _lengths_state(nkb_cap, splits, tiles, dsplits, w)
    got = {}
    for backend in ("torch", "triton"):
        _, outs = _lengths_state(nkb_cap, splits, tiles, dsplits, w)
        n_dev = torch.tensor(n_prefix, device=_dev())
        step_lengths(n_dev, bs, nq, count_table, dense_table, backend=backend, **outs)
        got[backend] = outs
    nkb = n_prefix // bs
    start, last = nkb * bs, n_prefix + nq - 1
    rows = torch.arange(w, device="cpu")
    want = dict(bias=torch.where(torch.arange(nkb_cap, device="cpu") < nkb, 0.0, -1e30),
                count=count_table[nkb].cpu().view(1, 1, -1),
                count_tiles=count_table[nkb].cpu().repeat_interleave(tiles).view(1, 1, -1),
                dense_count=dense_table[nkb].cpu().view(1, 1, -1),
                win_idx=torch.clamp(rows + start, max=last),
                win_bias=torch.where(rows <= last - start, 0.0, float("-inf")))
    for backend, outs in got.items():
        for name, value in want.items():
            assert torch.equal(outs[name].cpu(), value), (backend, name)
    # The window holds the partial block and the active block, exactly.
    assert int((want["win_bias"] == 0).sum()) == n_prefix - start + nq


def test_step_lengths_rejects_bad_input():
    (count_table, dense_table), outs = _lengths_state(6, 2, 1, 2, 10)
    with pytest.raises(ValueError, match="int64"):
        step_lengths(torch.tensor(5, dtype=torch.int32), 4, 2, count_table, dense_table, **outs)
    with pytest.raises(ValueError, match="count"):
        step_lengths(torch.tensor(5), 4, 2, count_table[:, :1], dense_table, **outs)


def _keys(b, h, c, d, dtype, seed=1):
    gen = torch.Generator().manual_seed(seed)
    k = torch.randn(b, h, c, d, generator=gen, device="cpu")
    k[:, :, :, 3] += 4.0 * torch.arange(c, device="cpu") / c  # a drift along the sequence: block means differ
    return k.to(_dev(), dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("bs,n_prefix", [(64, 0), (64, 700), (128, 1024), (32, 999)])
def test_prefix_block_means_kernel_matches_the_definition(dtype, bs, n_prefix):
    b, h, d = 2, 3, 64
    cap = 1100
    nkb_cap = cap // bs
    k = _keys(b, h, cap, d, dtype)
    k[:, :, (n_prefix // bs) * bs:] = float("nan")  # past the prefix's full blocks: never read
    scale = 1 / math.sqrt(d)
    n_dev = torch.tensor(n_prefix, device=_dev())
    nkb = n_prefix // bs
    for backend in ("torch", "triton"):
        means_t = torch.full((b, h, d, nkb_cap), 5.0, device=_dev())
        split = torch.full((3, b, h, d, nkb_cap), 5.0, dtype=torch.bfloat16, device=_dev())
        prefix_block_means(k, n_dev, bs, scale, means_t, split, backend=backend)
        got = means_t.cpu()
        assert torch.isfinite(got).all(), backend
        assert_means(got, k, n_prefix, bs, nkb_cap, scale, what=backend)
        torch.testing.assert_close(split.cpu().double().sum(dim=0), got.double(), **PARTS_TOL, msg=backend)
        if backend == "torch" or split.is_cuda:  # the interpreter rounds to bfloat16 its own way
            assert torch.equal(split.cpu(), split_means(means_t.transpose(-1, -2)).cpu()), backend
        if nkb < nkb_cap:
            assert not bool(got[..., nkb:].any()), backend


def test_prefix_block_means_without_split_and_bad_input():
    k = _keys(1, 2, 256, 32, torch.float32)
    means_t = torch.zeros(1, 2, 32, 4, device=_dev())
    want = torch.zeros_like(means_t)
    n_dev = torch.tensor(200, device=_dev())
    prefix_block_means(k, n_dev, 64, 0.5, want, backend="torch")
    prefix_block_means(k, n_dev, 64, 0.5, means_t, backend="triton")
    assert_within_baseline(means_t.cpu(), _definition(k, 200, 64, 4, 0.5), want.cpu())  # baseline: the torch path
    with pytest.raises(ValueError, match="means_t"):
        prefix_block_means(k, n_dev, 128, 0.5, means_t)  # 4 blocks of 128 do not fit 256 rows
    with pytest.raises(ValueError, match="split"):
        prefix_block_means(k, n_dev, 64, 0.5, means_t, torch.zeros(3, 1, 2, 32, 4, device=_dev()))
    with pytest.raises(ValueError, match="int64"):
        prefix_block_means(k, n_dev.int(), 64, 0.5, means_t)
    with pytest.raises(ValueError, match="unit stride"):  # the kernel's layout, not a silent slower path
        prefix_block_means(k.transpose(2, 3).contiguous().transpose(2, 3), n_dev, 64, 0.5, means_t,
                           backend="triton")


def _definition(k, n_prefix, bs, nkb_cap, scale, dtype=torch.float64):
    """The block means spelled out in ``dtype``: float64 gives the reference, float32 PyTorch's own baseline."""
    b, h, _, d = k.shape
    want = torch.zeros(b, h, d, nkb_cap, dtype=dtype, device="cpu")
    nkb = n_prefix // bs
    if nkb:
        want[..., :nkb] = (k[:, :, : nkb * bs].cpu().to(dtype).unflatten(2, (nkb, bs)).mean(dim=3) * scale).mT
    return want


def assert_means(got, k, n_prefix, bs, nkb_cap, scale, but=(), what="means"):
    """float32 block means ``got`` against the float64 definition, by PyTorch's float32 error (columns ``but``
    are taken from ``got``)."""
    ref, base = (_definition(k, n_prefix, bs, nkb_cap, scale, dtype) for dtype in (torch.float64, torch.float32))
    for j in but:
        ref[..., j], base[..., j] = got[..., j], got[..., j]
    assert_within_baseline(got, ref, base, what=what)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_prefix_block_means_compute_only_blocks_whose_last_key_changed(dtype, backend):
    b, h, d, bs, cap = 1, 2, 32, 64, 1100
    nkb_cap = cap // bs
    k = _keys(b, h, cap, d, dtype)
    scale = 0.25
    means_t = torch.zeros(b, h, d, nkb_cap, device=_dev())
    split = torch.zeros(3, b, h, d, nkb_cap, dtype=torch.bfloat16, device=_dev())
    last = torch.full((b, h, nkb_cap, d), float("nan"), dtype=dtype, device=_dev())

    def run(n_prefix):
        prefix_block_means(k, torch.tensor(n_prefix, device=_dev()), bs, scale, means_t, split, last_keys=last,
                           backend=backend)
        nkb = n_prefix // bs
        rows = k[:, :, bs - 1 : nkb * bs : bs].cpu()
        torch.testing.assert_close(last[:, :, :nkb].cpu(), rows, rtol=0, atol=0, equal_nan=True)
        assert last[:, :, nkb:].isnan().all()
        torch.testing.assert_close(split.cpu().double().sum(dim=0), means_t.cpu().double(), **PARTS_TOL,
                                   equal_nan=True)
        return means_t.cpu()

    def assert_definition(got, n_prefix, but=()):
        assert_means(got, k, n_prefix, bs, nkb_cap, scale, but)

    assert_definition(run(700), 700)  # 10 full blocks, all computed (nothing stored yet)
    means_t[..., 3] = 123.0  # a marker: block 3 keeps it (mean and parts) as long as its last key stays
    split[..., 3] = torch.tensor([123.0, 0.0, 0.0], dtype=torch.bfloat16, device=_dev())[:, None, None, None]
    assert bool((run(700)[..., 3] == 123.0).all())
    got = run(1000)  # the prefix grew: blocks 10-14 are computed, 0-9 kept
    assert bool((got[..., 3] == 123.0).all())
    assert_definition(got, 1000, but=[3])
    k[:, :, 3 * bs + 5] += 1.0  # a key inside block 3 and its last key change: recomputed
    k[:, :, 4 * bs - 1] += 1.0
    assert_definition(run(1000), 1000)
    k[:, :, 2 * bs : 3 * bs] = float("nan")  # a NaN last key equals nothing: the block is computed (NaN mean)
    assert run(1000)[..., 2].isnan().all()
    k[:, :, 2 * bs : 3 * bs] = _keys(b, h, bs, d, dtype, seed=5)
    got = run(300)  # shrunk to 4 full blocks: the others are zero, and computed again when the prefix grows
    assert_definition(got, 300)
    assert_definition(run(1000), 1000)
