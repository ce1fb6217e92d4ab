"""FlashBlock: exact at refresh_every=1, cached external attention merged by LSE, invalidation at new
block / prefix / generation, and the combined sparse + residual mode."""

import pytest
import torch
from test_kernels import low_precision_lse_tolerance

from sparsediff.kernels import index_to_mask, mask_to_index, merge_attention
from sparsediff.kernels.block_sparse.reference import (
    block_sparse_attention_ref,
    expand_block_mask,
    masked_attention_ref,
)
from sparsediff.kernels.merge.reference import merge_attention_ref
from sparsediff.methods import denoising_step, dense_attention, make_method, new_block, new_generation
from sparsediff.methods.flashblock import FlashBlockConfig
from sparsediff.methods.prefix_attention import prefix_attention, split_index
from sparsediff.testing.tolerance import ROUNDING, assert_close_as_pytorch, tolerance

ALL = torch.ones(1, dtype=torch.bool)
# Two float32 paths (PyTorch and Triton) of one LSE merge: a few roundings apart.
MERGE_TOL = tolerance(torch.float32, ulps=ROUNDING)


def block_call(b=1, hq=4, hkv=2, prefix=160, nq=32, d=16, dtype=torch.float32):
    q = torch.randn(b, hq, nq, d, dtype=dtype)
    k = torch.randn(b, hkv, prefix + nq, d, dtype=dtype)
    return q, k, torch.randn_like(k)


def ref_full(q, k, v):
    return masked_attention_ref(q.float(), k.float(), v.float(), ALL)


def attention(q, k, v, mask=ALL):
    """PyTorch's attention in the inputs' own dtype: float64 gives the reference, q's dtype the baseline."""
    return masked_attention_ref(q, k, v, mask, upcast=False)


def assert_attention(result, q, k, v, mask=ALL):
    """``result`` (out, or (out, lse)) against PyTorch's float64 attention: the output by PyTorch's own error in
    q's dtype; the LSE, float32 whatever q's dtype, by PyTorch's float32 error, or from float16/bfloat16 inputs
    within :func:`test_kernels.low_precision_lse_tolerance`."""
    out, lse = result if isinstance(result, tuple) else (result, None)
    assert_close_as_pytorch(out, lambda q, k, v: attention(q, k, v, mask)[0], q, k, v, what="out")
    if lse is None:
        return
    if q.dtype in (torch.float16, torch.bfloat16):
        ref = masked_attention_ref(q.double(), k.double(), v.double(), mask)[1]
        torch.testing.assert_close(lse.double(), ref, **low_precision_lse_tolerance(ref))
    else:
        assert_close_as_pytorch(lse, lambda q, k, v: attention(q, k, v, mask)[1], q, k, v, what="lse")


def dense_out(q, k, v):
    return attention(q, k, v)[0]


def method(**kw):
    return make_method("flashblock", **{"min_seq_len": 0, "block_size": 16, "cuda_graphs": False, **kw})


def test_config_validation():
    assert FlashBlockConfig().refresh_every is None
    with pytest.raises(ValueError, match="refresh_every"):
        FlashBlockConfig(refresh_every=0)
    with pytest.raises(ValueError, match="unknown selector"):
        FlashBlockConfig(sparse_selector="nope")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_refresh_every_step_is_dense(dtype):
    m = method(refresh_every=1)
    q0, k, v = block_call(dtype=dtype)
    for step in range(4):
        with denoising_step(step, 4):
            q = (q0.float() + 0.5 * step * torch.randn_like(q0.float())).to(dtype)
            out, lse = m(q, k, v, layer="l", return_lse=True)
        assert_attention((out, lse), q, k, v)
    assert m.stats["refreshes"] == 4 and m.stats["cached_calls"] == 0


@pytest.mark.parametrize("frames", [False, True])
def test_cached_external_merged_with_fresh_internal(frames):
    # Text: prompt + committed blocks as the prefix. Video: 3 earlier frames of 48 tokens, frame block of 48.
    shape = dict(prefix=144, nq=48, hq=6, hkv=3) if frames else dict(prefix=160, nq=32)
    m = method()
    q0, k, v = block_call(**shape)
    npre = k.shape[2] - q0.shape[2]

    def cached(q0, q, k, v):  # the external attention at the refresh's q0, the block's own at q
        ext = attention(q0, k[:, :, :npre], v[:, :, :npre])
        return merge_attention_ref(*ext, *attention(q, k[:, :, npre:], v[:, :, npre:]))[0]

    for step in range(4):
        q = q0 + 0.3 * step * torch.randn_like(q0)
        with denoising_step(step, 4):
            out = m(q, k, v, layer="l")
        assert_close_as_pytorch(out, cached, q0, q, k, v)
        if step == 0:
            assert_close_as_pytorch(out, dense_out, q, k, v)
        else:  # the cache is an approximation: it must differ from dense once q moved
            assert (out - ref_full(q, k, v)[0]).abs().max() > 1e-3
    assert m.stats == {"refreshes": 1, "cached_calls": 3, "dense_calls": 0}
    assert m.cache_bytes() == q0.numel() * 4 + q0[..., 0].numel() * 4 + layout_bytes(q0, k.shape[2], 16)


def layout_bytes(q, cap, block_size, splits=1):
    """Plain mode's bytes besides the cached output and LSE: the prefix length, row ids of the block and of
    the tail (with its mask), and the key-block ids and counts of the capacity. Ints only, no keys or values."""
    nq, nkb = q.shape[2], max(cap // block_size, 1)
    chunk = -(-nkb // splits)
    return 8 + 2 * 8 * nq + (8 + 8 + 4) * block_size + 4 * (splits * chunk + splits + (nkb + 1) * splits)


def test_cache_invalidated_at_new_block_prefix_and_generation():
    m = method()
    q, k, v = block_call()
    new_block(0)
    for step in range(3):
        with denoising_step(step, 3):
            m(q, k, v, layer="l")
    assert m.stats["refreshes"] == 1
    new_block(1)
    q1, k1, v1 = block_call()  # same shapes, new block: the old external attention is invalid
    with denoising_step(1, 3):
        out = m(q1, k1, v1, layer="l")
    assert_close_as_pytorch(out, dense_out, q1, k1, v1)
    assert m.stats["refreshes"] == 2
    q2, k2, v2 = block_call(prefix=176)  # prefix grew without a block event
    with denoising_step(2, 3):
        m(q2, k2, v2, layer="l")
    assert m.stats["refreshes"] == 3
    new_generation()
    with denoising_step(2, 3):
        m(q2, k2, v2, layer="l")
    assert m.stats == {"refreshes": 1, "cached_calls": 0, "dense_calls": 0}


def test_refresh_every_r_and_layers_are_separate():
    m = method(refresh_every=2)
    calls = {name: block_call() for name in ("a", "b")}
    for step in range(5):
        with denoising_step(step, 5):
            for name, (q, k, v) in calls.items():
                m(q, k, v, layer=name)
    assert m.stats["refreshes"] == 2 * 3 and m.stats["cached_calls"] == 2 * 2


def test_causal_or_prefix_free_calls_run_dense():
    m = method()
    q, k, v = block_call(prefix=0)
    with denoising_step(1, 4):
        torch.testing.assert_close(m(q, k, v), dense_attention(q, k, v), rtol=0, atol=0)
        q2, k2, v2 = block_call()
        torch.testing.assert_close(m(q2, k2, v2, causal=True), dense_attention(q2, k2, v2, causal=True), rtol=0,
                                   atol=0)
    assert m.stats["dense_calls"] == 2 and m.cache_bytes() == 0


def test_merge_matches_reference_with_empty_side():
    out_a, out_b = torch.randn(2, 3, 5, 8), torch.randn(2, 3, 5, 8)
    lse_a, lse_b = torch.randn(2, 3, 5), torch.randn(2, 3, 5)
    lse_b[0, 0, 0] = float("-inf")
    got, got_lse = merge_attention(out_a, lse_a, out_b, lse_b)
    want, want_lse = merge_attention_ref(out_a, lse_a, out_b, lse_b)
    torch.testing.assert_close((got, got_lse), (want, want_lse), **MERGE_TOL)
    torch.testing.assert_close(got[0, 0, 0], out_a[0, 0, 0], **MERGE_TOL)  # the empty side adds nothing


def structured_prefix(prefix=256, nq=32, d=16):
    """Queries that attend a few prefix blocks strongly, so sparse external attention is meaningful."""
    q, k, v = block_call(prefix=prefix, nq=nq, d=d)
    hot = 3 * torch.nn.functional.normalize(torch.randn(2, d), dim=-1)
    k[:, :, 32:48] += hot[:, None]
    k[:, :, 128:144] += hot[:, None]
    q += hot.repeat_interleave(2, 0)[None, :, None]
    return q, k, v


@pytest.mark.parametrize("selector", ["ba_att", "block_mean"])
def test_combined_mode_residual_exact_at_refresh(selector):
    m = method(sparse_selector=selector, sparsity=0.7)
    q, k, v = structured_prefix()
    with denoising_step(0, 4):
        first = m(q, k, v, layer="l")
    with denoising_step(1, 4):
        same_q = m(q, k, v, layer="l")  # sparse(q) + (dense - sparse)(q) == dense
    assert_close_as_pytorch(first, dense_out, q, k, v)
    assert_close_as_pytorch(same_q, dense_out, q, k, v)
    entry = m._cache.entries["l"]
    assert entry.block_count.float().mean() < 0.5 * 16  # really sparse: < half of the 16 prefix blocks


def test_combined_mode_matches_its_definition_and_residual_helps():
    q0, k, v = structured_prefix()
    npre = k.shape[2] - q0.shape[2]
    kp, vp = k[:, :, :npre], v[:, :, :npre]
    errs = {}
    for residual in (True, False):
        new_generation()
        m = method(sparse_selector="ba_att", sparsity=0.8, residual=residual)
        with denoising_step(0, 2):
            m(q0, k, v, layer="l")
        q = q0 + 0.05 * torch.randn_like(q0)
        with denoising_step(1, 2):
            out = m(q, k, v, layer="l")
        e = m._cache.entries["l"]

        def definition(q, kp, vp, k, v, res_out, res_lse, e=e, residual=residual):
            sp, sp_lse = block_sparse_attention_ref(q, kp, vp, e.block_index, e.block_count, block_size=16,
                                                    upcast=False)
            if residual:
                sp, sp_lse = sp + res_out, sp_lse + res_lse
            return merge_attention_ref(sp, sp_lse, *attention(q, k[:, :, npre:], v[:, :, npre:]))[0]

        assert_close_as_pytorch(out, definition, q, kp, vp, k, v, e.out, e.lse)
        errs[residual] = (out - ref_full(q, k, v)[0]).norm()
    assert errs[True] < 0.5 * errs[False]


@pytest.mark.parametrize("nq,splits", [(32, 3), (16, 8), (40, 1), (48, 2)])
@pytest.mark.parametrize("sparse", [False, True])
def test_split_prefix_attention_matches_reference(nq, splits, sparse):
    # Key chunks as extra query blocks, merged by LSE: equal to one pass over all (kept) keys.
    q = torch.randn(2, 4, nq, 16)
    k, v = torch.randn(2, 2, 300, 16), torch.randn(2, 2, 300, 16)
    index = count = None
    token_mask = torch.ones(1, dtype=torch.bool)
    if sparse:
        mask = torch.rand(2, 4, 1, 10) < 0.4
        mask[0, 0] = False  # a head that keeps nothing: zeros and lse = -inf
        index, count = mask_to_index(mask)
        nqb = -(-nq // 32)
        token_mask = expand_block_mask(index_to_mask(index, count, 10).expand(-1, -1, nqb, -1), nq, 300, 32)
    out, lse = prefix_attention(q, k, v, index, count, block_size=32, splits=splits)
    assert_attention((out, lse), q, k, v, token_mask)
    if nq <= 32 and splits > 1:  # a layout computed once and reused (FlashBlock's cached selection)
        layout = split_index(index, count, 10, splits, q.device)
        again, again_lse = prefix_attention(q, k, v, block_size=32, split=layout)
        assert_attention((again, again_lse), q, k, v, token_mask)


def test_pack_factor_stacks_kv_groups_into_a_query_block():
    from sparsediff.methods.prefix_attention import pack_factor

    assert pack_factor(32, 8, 32, 128, None) == 4  # block 32, GQA 4: the group fills one 128-row block
    assert pack_factor(32, 8, 32, 128, 8) == 4 and pack_factor(32, 8, 32, 128, 1) == 4
    assert pack_factor(32, 8, 32, 128, 32) == 1  # an index per query head cannot be shared
    assert pack_factor(32, 8, 128, 128, None) == 1  # a full block: nothing to fill
    assert pack_factor(48, 8, 32, 128, None) == 3  # group 6: the largest divisor that fits
    assert pack_factor(16, 16, 8, 128, None) == 1  # MHA


@pytest.mark.parametrize("sparse", [False, True])
def test_packed_gqa_prefix_attention_matches_reference(sparse):
    # Short block, GQA 8/2: four query heads share one query block; the index (per KV head) is shared too.
    from sparsediff.methods.prefix_attention import prefix_partials

    q = torch.randn(2, 8, 8, 16)
    k, v = torch.randn(2, 2, 300, 16), torch.randn(2, 2, 300, 16)
    index = count = None
    token_mask = torch.ones(1, dtype=torch.bool)
    if sparse:
        mask = torch.rand(2, 2, 1, 10) < 0.4
        mask[1, 0] = False  # a KV head whose group keeps nothing
        index, count = mask_to_index(mask)
        per_head = index_to_mask(index, count, 10).repeat_interleave(4, dim=1)
        token_mask = expand_block_mask(per_head, 8, 300, 32)
    assert prefix_partials(q, k, v, index, count, block_size=32, splits=3).pack == 4
    out, lse = prefix_attention(q, k, v, index, count, block_size=32, splits=3)
    assert_attention((out, lse), q, k, v, token_mask)


def test_packed_prefix_merge_triton_matches_torch():
    # Packed parts (2 heads per packed head) give what the unpacked layout gives, on both backends.
    from sparsediff.kernels.merge.prefix import merge_prefix, unpack_heads

    po, pl = torch.randn(2, 3, 4, 32, 16), torch.randn(2, 3, 4, 32)
    inner = (torch.randn(2, 6, 10, 16), torch.randn(2, 6, 10))
    active = torch.rand(2, 10) < 0.5
    caches = [(torch.randn(2, 6, 10, 16), torch.randn(2, 6, 10)) for _ in range(3)]
    caches[1] = (caches[0][0].clone(), caches[0][1].clone())
    caches[2] = (caches[0][0].clone(), caches[0][1].clone())
    want = merge_prefix(unpack_heads(po, 10, 2), unpack_heads(pl, 10, 2), 10, inner, cache=caches[0], active=active,
                        backend="torch")
    assert want[0].shape == (2, 6, 10, 16)
    for cache, backend in zip(caches[1:], ("torch", "triton")):
        got = merge_prefix(po, pl, 10, inner, cache=cache, active=active, backend=backend, pack=2)
        torch.testing.assert_close(got, want, **MERGE_TOL)
        torch.testing.assert_close(cache, caches[0], **MERGE_TOL)
    with pytest.raises(ValueError, match="pack"):
        merge_prefix(po, pl, 20, backend="torch", pack=2)  # 2 x 20 rows do not fit in R = 32


@pytest.mark.parametrize("nq,n_active", [(32, 3), (20, 7), (8, 8), (32, 0)])
def test_active_first_partials_compute_active_rows_only(nq, n_active):
    # Tokens ordered active-first, heads of a KV group stacked token-major; tiles without an active row skip.
    from sparsediff.kernels.merge.prefix import merge_prefix
    from sparsediff.methods.prefix_attention import active_first_partials, split_index

    q = torch.randn(2, 8, nq, 16)
    k, v = torch.randn(2, 2, 300, 16), torch.randn(2, 2, 300, 16)
    mask = torch.rand(2, 2, 1, 10) < 0.5
    mask[..., 0] = True
    index, count = mask_to_index(mask)
    active = torch.zeros(2, nq, dtype=torch.bool)
    active[0, torch.randperm(nq)[:n_active]] = True
    active[1, torch.randperm(nq)[: nq // 2]] = True
    parts = active_first_partials(q, k, v, split_index(index, count, 10, 3, q.device), active, block_size=32)
    assert parts.pack == 4 and sorted(parts.rank[0].tolist()) == list(range(nq))
    assert bool((parts.rank[0][active[0]] < n_active).all())  # active tokens take the leading rows
    live_rows = -(-n_active * 4 // 32) * 32  # whole tiles holding an active row
    assert bool(torch.isneginf(parts.lse[0, :, :, live_rows:]).all())  # the other tiles were skipped
    cache = (torch.zeros(2, 8, nq, 16), torch.zeros(2, 8, nq))
    out, lse = merge_prefix(parts.out, parts.lse, nq, cache=cache, active=active, pack=parts.pack, rank=parts.rank)
    token_mask = expand_block_mask(index_to_mask(index, count, 10).repeat_interleave(4, dim=1), nq, 300, 32)
    rows = active[:, None, :].expand(-1, 8, -1)
    assert_close_as_pytorch((out[rows], lse[rows]), lambda q, k, v: [t[rows] for t in attention(q, k, v, token_mask)],
                            q, k, v)
    assert bool((out[~rows] == 0).all())  # inactive rows read the (zero) cache


def test_token_major_merge_triton_matches_torch():
    from sparsediff.kernels.merge.prefix import merge_prefix

    nq = 12
    po, pl = torch.randn(2, 3, 4, 64, 16), torch.randn(2, 3, 4, 64)
    rank = torch.stack([torch.randperm(nq) for _ in range(2)])
    inner = (torch.randn(2, 12, nq, 16), torch.randn(2, 12, nq))
    got = [merge_prefix(po, pl, nq, inner, pack=4, rank=rank, backend=b) for b in ("torch", "triton")]
    torch.testing.assert_close(got[0], got[1], **MERGE_TOL)
    # Row rank[b, t] * 4 + j of packed head p is token t of head 4 p + j.
    one = merge_prefix(po, pl, nq, pack=4, rank=rank, backend="torch")
    b, p, j, t = 1, 2, 3, 5
    row = int(rank[b, t]) * 4 + j
    plain = merge_prefix(po[b:b + 1, p:p + 1, :, row:row + 1], pl[b:b + 1, p:p + 1, :, row:row + 1], 1,
                         backend="torch")
    torch.testing.assert_close(one[0][b, 4 * p + j, t], plain[0][0, 0, 0], **MERGE_TOL)
    with pytest.raises(ValueError, match="rank must be"):
        merge_prefix(po, pl, nq, pack=4, rank=rank[:, :5], backend="torch")


def test_prefix_merge_over_many_splits_matches_torch():
    # More splits than the kernel loads at once (chunks of 32): rows whose first chunk saw nothing, a row no
    # split saw, stable rows reading the cache; the same as the PyTorch merge.
    from sparsediff.kernels.merge.prefix import merge_prefix

    po, pl = torch.randn(2, 3, 70, 8, 16), 3 * torch.randn(2, 3, 70, 8)
    pl[:, :, :40, 1] = float("-inf")
    pl[0, 1, :, 2] = float("-inf")
    pl[1, 2, 5:, 3] = float("-inf")
    inner = (torch.randn(2, 3, 8, 16), torch.randn(2, 3, 8))
    active = torch.rand(2, 8) < 0.6
    active[0, 2] = True
    caches = [(torch.randn(2, 3, 8, 16), torch.randn(2, 3, 8)) for _ in range(2)]
    caches[1] = (caches[0][0].clone(), caches[0][1].clone())
    got = [merge_prefix(po, pl, 8, inner, cache=c, active=active, backend=b)
           for c, b in zip(caches, ("torch", "triton"))]
    torch.testing.assert_close(got[0], got[1], **MERGE_TOL)
    torch.testing.assert_close(caches[0], caches[1], **MERGE_TOL)
    plain = [merge_prefix(po, pl, 8, backend=b) for b in ("torch", "triton")]
    torch.testing.assert_close(plain[0], plain[1], **MERGE_TOL)
    assert bool(torch.isneginf(plain[1][1][0, 1, 2])) and bool((plain[1][0][0, 1, 2] == 0).all())


def force_splits(monkeypatch, n=8):
    """Take the split prefix path (what a GPU runs for short blocks) on CPU."""
    import sparsediff.methods.flashblock as fb
    import sparsediff.methods.losa.method as losa
    import sparsediff.methods.prefix_attention as pa

    def choose(q, num_kv_blocks, min_blocks_per_split=4, heads=None):
        return max(1, min(n, num_kv_blocks // min_blocks_per_split))

    def one_wave(q, num_kv_blocks, heads, min_blocks_per_split=2):
        return choose(q, num_kv_blocks, min_blocks_per_split)

    for module in (pa, fb, losa):
        monkeypatch.setattr(module, "choose_splits", choose)
    monkeypatch.setattr(losa, "one_wave_splits", one_wave)


def steady_state_ops(m, prefix=4096, nq=32, steps=3):
    """Device ops of each call after the block's first step (kernel and merge calls count one each)."""
    from sparsediff.testing.op_counter import OpCounter

    q, k, v = block_call(hq=8, hkv=2, prefix=prefix, nq=nq, d=32)
    new_block(0)
    counts = []
    for step in range(steps):
        moved = q + 0.3 * step * torch.randn_like(q) * (torch.rand(1, 1, nq, 1) < 0.25)
        with denoising_step(step, 16), OpCounter() as c:
            m(moved, k, v, layer="l")
        counts.append(c.total)
    return counts[1:]


@pytest.mark.parametrize("kw,bound", [({}, 2), (dict(sparse_selector="ba_att", sparsity=0.8), 5)])
def test_steady_state_op_count(monkeypatch, kw, bound):
    # Regression bound on launches per cached step (was 2 and 23 before the fused prefix merge).
    force_splits(monkeypatch)
    counts = steady_state_ops(make_method("flashblock", min_seq_len=0, block_size=32, cuda_graphs=False, **kw))
    assert max(counts) <= bound, counts


@pytest.mark.parametrize("residual", [False, True])
def test_fused_prefix_merge_triton_matches_torch(residual):
    from sparsediff.kernels.merge.prefix import merge_prefix

    po, pl = torch.randn(2, 3, 4, 16, 24), torch.randn(2, 3, 4, 16)
    pl[0, 0, :, 0] = float("-inf")  # a row no split saw
    inner = (torch.randn(2, 3, 10, 24), torch.randn(2, 3, 10))
    res = (0.01 * torch.randn(2, 3, 10, 24), 0.01 * torch.randn(2, 3, 10)) if residual else None
    active = torch.rand(2, 10) < 0.5
    caches = [(torch.randn(2, 3, 10, 24), torch.randn(2, 3, 10)) for _ in range(2)]
    caches[1] = (caches[0][0].clone(), caches[0][1].clone())
    got = [merge_prefix(po, pl, 10, inner, residual=res, cache=c, active=active, backend=b)
           for c, b in zip(caches, ("torch", "triton"))]
    torch.testing.assert_close(got[0], got[1], **MERGE_TOL)
    torch.testing.assert_close(caches[0], caches[1], **MERGE_TOL)
    # Stable rows kept their cache; the merge of splits equals one LSE merge of all parts.
    plain = merge_prefix(po, pl, 10, backend="torch")
    want = plain[0] + res[0] if residual else plain[0]
    torch.testing.assert_close(caches[0][0][active[:, None].expand(-1, 3, -1)],
                               want[active[:, None].expand(-1, 3, -1)], **MERGE_TOL)


def test_fused_prefix_merge_bf16_cache_matches_torch():
    # The cache's precision: rows read back from a bf16 cache equal the torch path's.
    from sparsediff.kernels.merge.prefix import merge_prefix

    po, pl = torch.randn(1, 4, 3, 32, 32).bfloat16(), torch.randn(1, 4, 3, 32)
    inner = (torch.randn(1, 4, 20, 32).bfloat16(), torch.randn(1, 4, 20))
    active = torch.rand(1, 20) < 0.5
    c0 = (torch.randn(1, 4, 20, 32).bfloat16(), torch.randn(1, 4, 20))
    c1 = (c0[0].clone(), c0[1].clone())
    a = merge_prefix(po, pl, 20, inner, cache=c0, active=active, backend="torch")
    b = merge_prefix(po, pl, 20, inner, cache=c1, active=active, backend="triton")
    # Equal up to a bf16 rounding or two (the paths sum the splits in different orders, then round).
    torch.testing.assert_close(a[0], b[0], **tolerance(torch.bfloat16))
    torch.testing.assert_close(c0[0], c1[0], **tolerance(torch.bfloat16))
    stable = ~active[:, None].expand(-1, 4, -1)
    torch.testing.assert_close(c1[0][stable], c0[0][stable], rtol=0, atol=0)  # stable rows untouched
