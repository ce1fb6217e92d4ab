"""LoSA's per-step kernels (``methods.losa.step_kernels``), each against its PyTorch reference: block ranking, the
window attention, the active-first order, the union score (split-bfloat16 kernel, float32 logits, the outlier
term), the change test, and block-sparse attention reading q once per split (``repeat_q``)."""

import pytest
import torch

from sparsediff.methods.losa.step_kernels import mean_key_score, rank_blocks, window_attention
from sparsediff.methods.prefix_attention import strided_layout
from sparsediff.testing.tolerance import ROUNDING, assert_close_as_pytorch, assert_within_baseline, tolerance

# The Triton union score against the float32 PyTorch path, by the rows' dtype: bfloat16 rows are exact in the
# kernel's split, a float32 row meets it as two bfloat16 parts (16 significant bits) summed in another order.
SCORE_TOL = {torch.bfloat16: tolerance(torch.float32, ulps=ROUNDING), torch.float32: tolerance(torch.float32)}


def _dev():
    return torch.get_default_device()  # the GPU under SPARSEDIFF_TEST_DEVICE=cuda


def ranked_scores(b=2, h=3, nkb=150, masked=7, seed=0):
    """Softmax-mass-like scores with many exact ties, zeros of both signs and LoSA's -1e30 past the prefix."""
    gen = torch.Generator().manual_seed(seed)
    s = torch.randint(0, 12, (b, h, nkb), generator=gen, device="cpu").float() / 8  # coarse values: many ties
    s[..., ::5] = 0.0
    s[..., 1::10] = -0.0
    s[..., nkb - masked:] += -1e30  # LoSA's bias past the prefix: equal scores, ranked last by index
    return s.to(_dev())


def torch_rank(score, keep, splits):
    index = torch.sort(score, dim=-1, descending=True, stable=True).indices[:, :, None, :keep].to(torch.int32)
    return strided_layout(index, splits) if splits > 1 else index


@pytest.mark.parametrize("nkb,keep", [(150, 30), (150, 150), (37, 1), (16, 5)])
@pytest.mark.parametrize("splits", [1, 3, 4])
def test_rank_blocks_kernel_equals_stable_descending_sort(nkb, keep, splits):
    score = ranked_scores(nkb=nkb)
    want = torch_rank(score, keep, splits)
    got = rank_blocks(score, keep, splits, backend="triton")
    assert got.dtype == torch.int32 and got.shape == want.shape
    assert torch.equal(got, want)
    assert torch.equal(rank_blocks(score, keep, splits, backend="torch"), want)
    if splits == 1 and keep == nkb:  # the whole order: a permutation, the -1e30 blocks last in index order
        assert torch.equal(got[0, 0, 0, -7:].long(), torch.arange(nkb - 7, nkb, device=got.device))


@pytest.mark.parametrize("splits", [1, 3])
def test_rank_blocks_first_puts_block_zero_ahead(splits):
    # keep_sinks: block 0 first even when its score is the lowest (or another is NaN), the rest in order.
    score = ranked_scores(nkb=60)
    score[..., 0] = -5.0
    score[0, 0, 7] = float("nan")
    rest = torch.sort(score[..., 1:], dim=-1, descending=True, stable=True).indices + 1
    order = torch.cat([torch.zeros_like(rest[..., :1]), rest], dim=-1)[:, :, None, :20].to(torch.int32)
    want = strided_layout(order, splits) if splits > 1 else order
    for backend in ("torch", "triton"):
        got = rank_blocks(score, 20, splits, first=True, backend=backend)
        assert torch.equal(got, want), backend
    assert not bool((rank_blocks(score, 20, 1, backend="torch") == 0).any())  # without it block 0 is dropped


@pytest.mark.parametrize("first", [False, True])
def test_rank_blocks_repeat_writes_each_split_row_per_query_tile(first):
    # repeat=R: the layout a split attention with R query tiles per split reads, no copy afterwards.
    score = ranked_scores(nkb=90)
    for keep, splits in ((30, 4), (90, 1), (7, 3)):
        want = torch_rank(score, keep, splits) if not first else rank_blocks(score, keep, splits, first=True,
                                                                             backend="torch")
        for backend in ("torch", "triton"):
            got = rank_blocks(score, keep, splits, first=first, repeat=3, backend=backend)
            assert torch.equal(got, want.repeat_interleave(3, dim=2)), (backend, keep, splits)
    with pytest.raises(ValueError, match="repeat"):
        rank_blocks(score, 5, repeat=0)


def test_rank_blocks_kernel_nan_signed_zero_and_strides():
    score = ranked_scores(b=1, h=4, nkb=70)
    score[0, 1, [3, 40]] = float("nan")  # torch's descending sort puts NaN first, in index order
    score[0, 2, 10] = float("inf")
    score[0, 2, 11] = float("-inf")
    score[0, 3] = torch.where(torch.arange(70, device=score.device) % 2 == 0, 0.0, -0.0)  # all equal: index order
    for s in (score, score.transpose(0, 1).contiguous().transpose(0, 1), torch.cat([score, score], -1)[..., ::2]):
        for keep, splits in ((70, 1), (9, 2)):
            assert torch.equal(rank_blocks(s, keep, splits, backend="triton"), torch_rank(s, keep, splits))
    full = rank_blocks(score, 70, 1, backend="triton")[0, :, 0]
    assert full[1, :2].tolist() == [3, 40] and full[2, 0] == 10
    assert torch.equal(full[3].long(), torch.arange(70, device=full.device))


def test_rank_blocks_random_scores_and_bad_input():
    score = torch.rand(2, 8, 1040, generator=torch.Generator().manual_seed(3), device="cpu").to(_dev())
    score[..., 1024:] -= 1e30
    assert torch.equal(rank_blocks(score, 205, 5, backend="triton"), torch_rank(score, 205, 5))
    with pytest.raises(ValueError, match="float32"):
        rank_blocks(score.double(), 5)
    with pytest.raises(ValueError, match="keep"):
        rank_blocks(score, 2000)
    with pytest.raises(ValueError, match="backend"):
        rank_blocks(score, 5, backend="cuda")


def window_inputs(b=2, hq=6, hkv=2, nq=5, d=16, cap=90, start=64, valid=11, w=24, dtype=torch.float32, seed=0):
    """q, a KV buffer with NaN in the rows the window must not read, and LoSA's window rows and mask."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, nq, d, generator=gen, device="cpu").to(_dev(), dtype)
    k = torch.randn(b, hkv, cap, d, generator=gen, device="cpu")
    v = torch.randn(b, hkv, cap, d, generator=gen, device="cpu")
    last = start + valid - 1
    k[:, :, last + 1:] = float("nan")
    v[:, :, last + 1:] = float("nan")
    rows = torch.arange(w, device="cpu")
    idx = torch.minimum(rows + start, torch.tensor(last, device="cpu")).to(_dev())  # padding repeats the last valid row
    bias = torch.where(rows < valid, 0.0, float("-inf")).to(_dev())
    return q, k.to(_dev(), dtype), v.to(_dev(), dtype), idx, bias


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [dict(), dict(hq=4, hkv=4, nq=3, w=160, valid=100, start=0, cap=128, d=32),
                                   dict(b=1, hq=8, hkv=2, nq=16, w=80, valid=80, start=10, cap=90)])
def test_window_attention_kernel_matches_torch(dtype, shape):
    q, k, v, idx, bias = window_inputs(dtype=dtype, **shape)
    scale = q.shape[-1] ** -0.5
    want_o, want_l = window_attention(q, k, v, idx, bias, scale, backend="torch")
    got_o, got_l = window_attention(q.transpose(1, 2).contiguous().transpose(1, 2), k, v, idx, bias, scale,
                                    backend="triton")  # any q strides
    assert got_o.dtype == torch.float32 and got_o.shape == q.shape and got_l.shape == q.shape[:3]
    assert torch.isfinite(got_o).all() and torch.isfinite(got_l).all()
    # Definition, in float64: softmax over the valid window rows only; the float32 PyTorch path is the baseline.
    valid = int((bias == 0).sum())
    g = q.shape[1] // k.shape[1]
    kk = k[:, :, idx[:valid]].double().repeat_interleave(g, 1)
    logits = (q.double() @ kk.transpose(-1, -2)) * scale
    ref_o = torch.softmax(logits, -1) @ v[:, :, idx[:valid]].double().repeat_interleave(g, 1)
    assert_within_baseline(got_o, ref_o, want_o, what="out")
    assert_within_baseline(got_l, torch.logsumexp(logits, -1), want_l, what="lse")


def test_window_attention_rejects_bad_input():
    q, k, v, idx, bias = window_inputs()
    with pytest.raises(ValueError, match="do not match"):
        window_attention(q[:, :5], k, v, idx, bias, 0.25)
    with pytest.raises(ValueError, match="idx"):
        window_attention(q, k, v, idx.int(), bias, 0.25)
    with pytest.raises(ValueError, match="idx"):
        window_attention(q, k, v, idx, bias[:-1], 0.25)


@pytest.mark.parametrize("shape", [(2, 8, 4, 6, 16, 32), (1, 4, 4, 32, 16, 128), (3, 6, 2, 5, 32, 16)])
def test_active_first_order_kernel_equals_active_first_rows(shape):
    from sparsediff.methods.losa.step_kernels import active_first_order
    from sparsediff.methods.prefix_attention import active_first_rows

    b, hq, hkv, nq, d, bs = shape
    gen = torch.Generator().manual_seed(nq)
    q = torch.randn(b, hq, nq, d, generator=gen, device="cpu").to(_dev(), torch.bfloat16)
    active = (torch.rand(b, nq, generator=gen, device="cpu") < 0.4).to(_dev())
    active[0] = False  # a row without active tokens
    if b > 2:
        active[2] = True  # and one with only active tokens
    for qq in (q, q.transpose(1, 2).contiguous().transpose(1, 2)):  # any q strides
        want = active_first_rows(qq, active, hkv, bs)
        stacked, rank, n_rows, stat = active_first_order(qq, active, hkv, bs)
        assert torch.equal(stacked, want.stacked)  # padding rows included (zeros)
        assert rank.dtype == want.rank.dtype and torch.equal(rank, want.rank)
        assert n_rows.dtype == torch.int32 and torch.equal(n_rows, want.n_rows)
        assert torch.equal(stat, torch.cat([active, active.any(dim=1, keepdim=True)], dim=1))
    with pytest.raises(ValueError, match="bool"):
        active_first_order(q, active.int(), hkv, bs)


# -- The union score from float32 logits (mean_key_score's "logits" backend) ------------------------------

def live_mass_ref(logits, bias, live):
    """The score's definition in float64: per batch row the first ``live[b]`` rows' softmax mass per block of
    ``logits + bias`` (``(B, H, R, nkb)``), plus the bias."""
    probs = torch.softmax(logits.double() + bias.double(), dim=-1)
    return [probs[b, :, :n].sum(dim=1) + bias.double() for b, n in enumerate(live)]


def assert_live_mass(score, rows, means, bias, live, ulps):
    """``score`` is within ``ulps`` float32 epsilons of :func:`live_mass_ref` of the float64 logits of ``rows``
    against ``means``, per batch row."""
    for i, ref in enumerate(live_mass_ref(rows.double() @ means.double().transpose(-1, -2), bias, live)):
        torch.testing.assert_close(score[i].double(), ref, **tolerance(torch.float32, ulps=ulps))


@pytest.mark.parametrize("shape,live", [((2, 3, 70, 16, 37, 5), [0, 33]), ((2, 3, 70, 16, 37, 5), [70, 1]),
                                        ((1, 2, 64, 32, 300, 40), [17])])
def test_mean_key_score_logits_backend_matches_float64(shape, live):
    from sparsediff.methods.losa.step_kernels import mean_key_score

    b, h, r, d, nkb, masked = shape
    rows, means, bias = score_inputs(b, h, r, d, nkb, masked, dtype=torch.bfloat16, seed=len(live) + live[0],
                                     spread=0.3 * d ** -0.5)
    n_live = torch.tensor(live, device=rows.device)
    got = mean_key_score(rows, n_live, means, bias, backend="logits")
    want = mean_key_score(rows, n_live, means, bias, backend="torch")
    assert_live_mass(got, rows, means, bias, live, ROUNDING)
    torch.testing.assert_close(got, want, **tolerance(torch.float32, ulps=ROUNDING))
    assert bool((got[..., -shape[5]:] <= -1e29).all())  # blocks past the prefix rank last
    keep = 8
    assert torch.equal(rank_blocks(got, keep), rank_blocks(want, keep))  # the same ranked ids


def test_mean_key_score_logits_backend_on_losa_structured_inputs():
    # The ids LoSA ranks from the logits path equal the float32 PyTorch path's on the fidelity generator.
    from sparsediff.methods.losa.step_kernels import mean_key_score
    from sparsediff.methods.prefix_attention import active_first_rows

    gen = torch.Generator().manual_seed(3)
    b, hq, hkv, nq, d, bs, nkb = 1, 8, 2, 32, 32, 16, 48
    q = torch.randn(b, hq, nq, d, generator=gen, device="cpu").to(_dev(), torch.bfloat16)
    k = torch.randn(b, hkv, nkb * bs, d, generator=gen, device="cpu").to(_dev(), torch.bfloat16)
    k[:, :, 5 * bs: 6 * bs] += 0.8 * q[:, ::4, :1].float().mean(dim=2, keepdim=True).to(k.dtype)  # a hot block
    active = torch.rand(b, nq, generator=gen, device="cpu").to(_dev()) < 0.3
    rows = active_first_rows(q, active, hkv, bs)
    means = k.float().view(b, hkv, nkb, bs, d).mean(dim=3) * d ** -0.5
    bias = torch.zeros(nkb, device=_dev())
    got = mean_key_score(rows.stacked, rows.n_rows, means, bias, backend="logits")
    want = mean_key_score(rows.stacked, rows.n_rows, means, bias, backend="torch")
    assert torch.equal(rank_blocks(got, 10, 3), rank_blocks(want, 10, 3))


# -- Block-sparse attention with q read repeatedly (the splits of prefix attention) ------------------------

@pytest.mark.parametrize("backend", ["triton", "torch"] + (["gluon"] if torch.cuda.is_available() else []))
def test_block_sparse_repeat_q_equals_the_copy(backend):
    from sparsediff.kernels import block_sparse_attention

    gen = torch.Generator().manual_seed(1)
    bs = 128 if backend == "gluon" else 16
    b, hq, hkv, d, reps, nkb = 1, 4, 2, 128 if backend == "gluon" else 32, 3, 6
    q = torch.randn(b, hq, 2 * bs, d, generator=gen, device="cpu").to(_dev(), torch.bfloat16)
    k = torch.randn(b, hkv, nkb * bs, d, generator=gen, device="cpu").to(_dev(), torch.bfloat16)
    v = torch.randn_like(k)
    nqb = 2 * reps
    index = torch.randint(0, nkb, (b, hq, nqb, 4), generator=gen, device="cpu").to(_dev(), torch.int32)
    count = torch.randint(0, 5, (b, hq, nqb), generator=gen, device="cpu").to(_dev(), torch.int32)
    kw = dict(block_size=bs, return_lse=True, backend=backend)
    want = block_sparse_attention(q.repeat(1, 1, reps, 1), k, v, index, count, **kw)
    got = block_sparse_attention(q, k, v, index, count, repeat_q=reps, **kw)
    assert got[0].shape == want[0].shape and torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    with pytest.raises(ValueError, match="multiple of block_size"):
        block_sparse_attention(q[:, :, 1:], k, v, index, count, repeat_q=reps, **kw)
    with pytest.raises(ValueError, match="non-causal"):
        block_sparse_attention(q, k, v, index, count, repeat_q=reps, causal=True, **kw)
    with pytest.raises(ValueError, match="repeat_q"):
        block_sparse_attention(q, k, v, index[:, :, :2], count[:, :, :2], repeat_q=0, **kw)


# -- The union score (mean_key_score) and the change test (token_change_update) -----------------------------

def score_inputs(b=2, h=3, r=70, d=16, nkb=37, masked=5, dtype=torch.float32, device=None, seed=0, spread=0.3):
    gen = torch.Generator().manual_seed(seed)
    device = torch.get_default_device() if device is None else device  # the GPU under SPARSEDIFF_TEST_DEVICE=cuda
    rows = torch.randn(b, h, r, d, generator=gen, device="cpu").to(device, dtype)
    means_t = (spread * torch.randn(b, h, d, nkb, generator=gen, device="cpu")).to(device)  # LoSA's layout
    means_t[:, :, :, 3] += 0.5 * rows[:, :, :4].float().mean(dim=2)  # one block the leading rows point at
    bias = torch.zeros(nkb, device=device)
    bias[nkb - masked:] = -1e30
    return rows, means_t.transpose(-1, -2), bias


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("live", [[0, 33], [70, 1], [5, 64]])
def test_mean_key_score_triton_matches_torch(dtype, live):
    from sparsediff.methods.losa.step_kernels import mean_key_score

    rows, means, bias = score_inputs(dtype=dtype)
    n_live = torch.tensor(live, device=rows.device)
    want = mean_key_score(rows, n_live, means, bias, backend="torch")
    got = mean_key_score(rows, n_live, means, bias, backend="triton")
    assert_live_mass(want, rows, means, bias, live, ROUNDING)
    torch.testing.assert_close(got, want, **SCORE_TOL[dtype])
    assert bool((got[:, :, -5:] <= -1e29).all())  # masked blocks rank last
    keep = 8
    assert torch.equal(got.topk(keep).indices.sort().values, want.topk(keep).indices.sort().values)


@pytest.mark.parametrize("shape,live,block_n", [
    ((2, 3, 70, 16, 37, 5), [0, 70], 16),  # no live row, all rows; 37 blocks in chunks of 16
    ((2, 3, 70, 16, 37, 5), [33, 1], 32),  # ragged: a partial row tile, one row
    ((1, 2, 64, 32, 300, 40), [17], 16),  # 19 chunks, the last one partial
    ((3, 2, 40, 16, 50, 3), [40, 7, 45], 16),  # B = 3; n_live past R counts R rows
    ((1, 2, 20, 16, 20, 20), [20], 16),  # every block masked: uniform mass, no NaN
])
def test_mean_key_score_chunked_kernel_matches_float64(shape, live, block_n):
    from sparsediff.methods.losa.step_kernels import split_means
    from sparsediff.methods.losa.step_triton import mean_key_score_triton

    b, h, r, d, nkb, masked = shape
    rows, means, bias = score_inputs(b, h, r, d, nkb, masked, dtype=torch.bfloat16, seed=sum(live),
                                     spread=0.3 * d ** -0.5)
    n_live = torch.tensor(live, device=rows.device)
    strided = rows.transpose(1, 2).contiguous().transpose(1, 2)  # rows of a head not adjacent
    got = mean_key_score_triton(strided, n_live, split_means(means), bias, block_n=block_n)
    want = mean_key_score(rows, n_live, means, bias, backend="torch")
    assert got.shape == (b, h, nkb) and got.dtype == torch.float32
    assert_live_mass(got, rows, means, bias, live, ROUNDING)
    torch.testing.assert_close(got, want, **tolerance(torch.float32, ulps=ROUNDING))
    for i, n in enumerate(live):
        if n == 0:  # no mass, only the bias
            assert torch.equal(got[i], bias.expand(h, nkb))
    if masked < nkb:
        assert bool((got[..., -masked:] <= -1e29).all()) and bool((got[..., :-masked] > -1e29).all())
        order = rank_blocks(got, nkb)[..., 0, -masked:].long()  # the masked blocks last, in index order
        assert torch.equal(order, torch.arange(nkb - masked, nkb, device=got.device).expand_as(order))
        assert torch.equal(rank_blocks(got, 8, 3), rank_blocks(want, 8, 3))  # the same ranked ids
    again = mean_key_score_triton(strided, n_live, split_means(means), bias, block_n=block_n)
    assert torch.equal(got, again)  # fixed summation order


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mean_key_score_default_path_on_losa_structured_inputs(dtype):
    # What LoSA calls: the stacked active-first rows of a block, the means split once; the ranked ids equal
    # the float32 PyTorch path's. 128 stacked rows span 4 row tiles; 150 blocks, 3 chunks of up to 64.
    from sparsediff.methods.losa.step_kernels import split_means
    from sparsediff.methods.prefix_attention import active_first_rows

    gen = torch.Generator().manual_seed(5)
    b, hq, hkv, nq, d, bs, nkb = 2, 8, 2, 32, 32, 16, 150
    q = torch.randn(b, hq, nq, d, generator=gen, device="cpu").to(_dev(), dtype)
    k = torch.randn(b, hkv, nkb * bs, d, generator=gen, device="cpu").to(_dev(), torch.bfloat16)
    k[:, :, 5 * bs: 6 * bs] += 0.8 * q[:, ::4, :1].float().mean(dim=2, keepdim=True).to(k.dtype)  # a hot block
    active = torch.rand(b, nq, generator=gen, device="cpu").to(_dev()) < 0.4
    rows = active_first_rows(q, active, hkv, bs)
    means_t = k.float().view(b, hkv, nkb, bs, d).mean(dim=3).transpose(-1, -2).contiguous() * d ** -0.5
    means = means_t.transpose(-1, -2)  # LoSA's layout: (B, H, D, nkb) storage
    bias = torch.zeros(nkb, device=_dev())
    bias[-3:] = -1e30
    got = mean_key_score(rows.stacked, rows.n_rows, means, bias, split=split_means(means), backend="triton")
    want = mean_key_score(rows.stacked, rows.n_rows, means, bias, backend="torch")
    torch.testing.assert_close(got, want, **SCORE_TOL[dtype])
    assert torch.equal(rank_blocks(got, 10, 3), rank_blocks(want, 10, 3))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs")
def test_mean_key_score_kernel_in_a_cuda_graph_follows_n_live():
    # No host read of n_live: one captured launch serves every live count.
    rows, means, bias = score_inputs(b=1, h=8, r=512, d=128, nkb=1040, masked=16, dtype=torch.bfloat16,
                                     device="cuda", spread=0.3 * 128 ** -0.5)
    from sparsediff.methods.losa.step_kernels import split_means

    split = split_means(means)
    n_live = torch.tensor([1], device="cuda", dtype=torch.int32)
    mean_key_score(rows, n_live, means, bias, split=split)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
        out = mean_key_score(rows, n_live, means, bias, split=split)
    torch.cuda.current_stream().wait_stream(stream)
    for live in (0, 37, 128, 512):
        n_live.fill_(live)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, mean_key_score(rows, n_live, means, bias, split=split))
        ref = live_mass_ref(rows.double() @ means.double().transpose(-1, -2), bias, [live])[0]
        torch.testing.assert_close(out[0].double(), ref, **tolerance(torch.float32, ulps=ROUNDING))


def test_mean_key_score_rejects_bad_input():
    from sparsediff.methods.losa.step_kernels import mean_key_score

    rows, means, bias = score_inputs()
    with pytest.raises(ValueError, match="n_live"):
        mean_key_score(rows, torch.tensor([1.0, 2.0]), means, bias)
    with pytest.raises(ValueError, match="split"):
        mean_key_score(rows, torch.tensor([1, 2]), means, bias, split=torch.zeros(3, 2, 3, 16, 36), backend="triton")
    with pytest.raises(TypeError, match="float32"):
        mean_key_score(rows, torch.tensor([1, 2]), means.double(), bias)
    with pytest.raises(ValueError, match="bias"):
        mean_key_score(rows, torch.tensor([1, 2]), means, bias[:-1])
    with pytest.raises(ValueError, match="do not match"):
        mean_key_score(rows[:, :2], torch.tensor([1, 2]), means, bias)
    with pytest.raises(ValueError, match="outliers must be"):
        mean_key_score(rows, torch.tensor([1, 2]), means, bias, outliers=means[:, :, :-1])
    with pytest.raises(ValueError, match="outliers need"):
        mean_key_score(rows, torch.tensor([1, 2]), means, bias, outliers=means, backend="triton")


@pytest.mark.parametrize("backend", ["torch", "logits"])
def test_mean_key_score_with_outlier_keys(backend):
    import math

    from sparsediff.methods.losa.step_kernels import mean_key_score

    rows, means, bias = score_inputs()
    noise = torch.randn(means.shape, generator=torch.Generator().manual_seed(1), device="cpu")
    outliers = means + 0.2 * noise.to(means.device)
    outliers[:, :, 7] += 2.0 * rows[:, :, :4].float().mean(dim=2)  # a single hot key in block 7
    n_live = torch.tensor([4, 70], device=rows.device)
    got = mean_key_score(rows, n_live, means, bias, outliers=outliers, block_size=16, backend=backend)
    r64 = rows.double()
    logits = torch.logaddexp(r64 @ means.double().transpose(-1, -2),
                             r64 @ outliers.double().transpose(-1, -2) - math.log(16))
    for i, ref in enumerate(live_mass_ref(logits, bias, [4, 70])):
        torch.testing.assert_close(got[i].double(), ref, **tolerance(torch.float32, ulps=ROUNDING))
    plain = mean_key_score(rows, n_live, means, bias, backend="torch")
    assert bool((got[0, :, 7] > plain[0, :, 7]).all())  # the hot key lifts its block for the rows it serves


@pytest.mark.skipif(not torch.cuda.is_available(), reason="compares the CUDA kernel with the float32 path")
def test_mean_key_score_on_gpu_keeps_the_float32_union():
    # LoSA's sizes at a 128k prefix (GQA 32/8, 128-token block: 512 stacked rows, a quarter of them live).
    from sparsediff.methods.losa.step_kernels import mean_key_score

    rows, means, bias = score_inputs(b=1, h=8, r=512, d=128, nkb=1040, masked=16, dtype=torch.bfloat16,
                                     device="cuda")
    means = means * 128 ** -0.5
    n_live = torch.tensor([128], device="cuda")
    want = mean_key_score(rows, n_live, means, bias, backend="torch")
    got = mean_key_score(rows, n_live, means, bias)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)  # GPU-only (bfloat16 tensor-core split), kept as set
    keep = 205
    same = [set(a.tolist()) == set(b.tolist()) for a, b in zip(got.topk(keep).indices[0], want.topk(keep).indices[0])]
    assert sum(same) >= 7, same  # near-ties at the cut may swap one block in rare heads


@pytest.mark.parametrize("only_active", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_token_change_triton_matches_torch(only_active, dtype):
    from sparsediff.methods.losa.step_kernels import token_change_update

    gen = torch.Generator().manual_seed(1)
    q = torch.randn(2, 6, 10, 16, generator=gen, device="cpu").to(dtype)
    ref = torch.randn(2, 6, 10, 16, generator=gen, device="cpu")
    ref[:, :, :5] = q[:, :, :5].float() + 1e-3 * torch.randn(2, 6, 5, 16, generator=gen, device="cpu")  # barely moved
    q, ref = q.to(torch.get_default_device()), ref.to(torch.get_default_device())
    thr = torch.full((2, 10), 1e-2)
    outs = []
    for backend, qq in (("torch", q), ("triton", q.transpose(1, 2).contiguous().transpose(1, 2))):  # any strides
        r, t = ref.clone(), thr.clone()
        outs.append((token_change_update(qq, r, t, 0.1, only_active=only_active, backend=backend), r, t))
    (a, r, t), (a2, r2, t2) = outs
    assert torch.equal(a, a2) and a[:, :5].logical_not().all() and a[:, 5:].all()
    assert torch.equal(r, r2)
    torch.testing.assert_close(t, t2, **tolerance(torch.float32, ulps=ROUNDING))
    moved = torch.ones(10, dtype=torch.bool, device=a.device) if not only_active else a[0]
    torch.testing.assert_close(r[0][:, moved], q[0][:, moved].float(), rtol=0, atol=0)
    assert_close_as_pytorch(t[0][moved], lambda q: 0.01 * q.square().sum(dim=(0, 2)), q[0][:, moved].float())
    if only_active:  # stable tokens keep their references
        assert torch.equal(r[:, :, :5], ref[:, :, :5]) and torch.equal(t[:, :5], thr[:, :5])
    with pytest.raises(ValueError, match="q_ref"):
        token_change_update(q, ref.double(), thr, 0.1)
