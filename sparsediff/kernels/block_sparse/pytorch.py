"""Pure-PyTorch block-sparse attention: gathers the kept key blocks and works in chunks of query
blocks, so the Nq x Nk score matrix is never materialised. Used on CPU and wherever Triton cannot
run. On CPU the query blocks are sorted by kept count and each chunk is only as wide as its widest row,
and goes through PyTorch's fused flash attention (float32 accumulation; float64 for float64 inputs);
elsewhere (no host syncs, so CUDA graphs can capture it) every chunk is ``max_kept`` blocks wide, through
explicit float32 math. Returns the input dtype.
"""

from __future__ import annotations

import math

import torch

# Bytes of scores one chunk may hold; bounds peak memory independently of sequence length.
_CHUNK_BYTES = 64 * 2**20


def _attend(q, k, v, valid, scale, acc):
    """Attention of (R, 1, bq, D) queries to (R, 1, bk, D) keys under an optional bool mask -> (out, lse)."""
    if q.device.type == "cpu":
        # PyTorch's fused CPU flash attention returns the LSE too; fully masked rows are fixed by the caller.
        bias = None if valid is None else torch.zeros(valid.shape, dtype=q.dtype, device=q.device).masked_fill_(
            ~valid, float("-inf"))
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, False, attn_mask=bias, scale=scale
        )[:2]
        return out, lse.float()
    scores = torch.matmul(q.to(acc), k.to(acc).transpose(-1, -2)) * scale
    if valid is not None:
        scores = scores.masked_fill(~valid, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - lse.masked_fill(torch.isinf(lse), 0.0)[..., None])
    return torch.matmul(probs, v.to(acc)), lse.float()


def _bucketed_cpu(q, k, v, index, count, *, scale, causal, block_size):
    """CPU: query blocks sorted by their kept count and gathered in chunks as wide as their widest row, so rows
    that keep few blocks do not pay for the widest one (budgets that differ per row: global allocation)."""
    bsz, hq, nq, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    group = hq // hkv
    nqb, nkb = math.ceil(nq / block_size), math.ceil(nk / block_size)
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32

    def blocks(x, n, nb):
        x = torch.nn.functional.pad(x, (0, 0, 0, nb * block_size - n))
        return x.reshape(x.shape[0] * x.shape[1], nb, block_size, d)

    k_blocks, v_blocks, q_blocks = blocks(k, nk, nkb), blocks(v, nk, nkb), blocks(q, nq, nqb)
    dev = q.device  # the inputs' CPU, not the default device (which may be CUDA)
    rows = torch.arange(bsz * hq * nqb, device=dev)
    flat_index = index.reshape(-1, index.shape[-1])
    flat_count = count.reshape(-1)
    kv_of = (rows // (hq * nqb)) * hkv + (rows // nqb) % hq // group  # (batch, kv head) of each row
    qb_of = rows % nqb
    q_of = rows // nqb  # (batch, query head)
    out = torch.zeros(bsz * hq * nqb, block_size, d, dtype=q.dtype, device=dev)
    lse = torch.full((bsz * hq * nqb, block_size), float("-inf"), device=dev)
    order = torch.argsort(flat_count, descending=True, stable=True)
    counts = flat_count[order].tolist()
    in_block = torch.arange(block_size, device=dev)
    start = 0
    while start < len(order) and counts[start] > 0:
        width = counts[start]
        per_row = width * block_size * block_size * torch.finfo(acc).bits // 8 * 3
        stop = min(len(order), start + max(1, _CHUNK_BYTES // per_row))
        sel = order[start:stop]
        ids = flat_index[sel, :width].long()  # (n, w)
        kg = k_blocks[kv_of[sel, None], ids].reshape(len(sel), 1, width * block_size, d)
        vg = v_blocks[kv_of[sel, None], ids].reshape(len(sel), 1, width * block_size, d)
        qc = q_blocks[q_of[sel], qb_of[sel]].reshape(len(sel), 1, block_size, d)
        key_pos = (ids[..., None] * block_size + in_block).reshape(len(sel), 1, width * block_size)
        slot_ok = torch.arange(width, device=dev)[None, :] < flat_count[sel, None]
        slot_ok = slot_ok.repeat_interleave(block_size, dim=1)
        valid = (slot_ok[:, None, :] & (key_pos < nk)).expand(len(sel), block_size, width * block_size)
        if causal:
            query_pos = qb_of[sel, None] * block_size + in_block
            valid = valid & (key_pos <= query_pos[:, :, None] + (nk - nq))
        valid = valid[:, None]
        o, chunk_lse = _attend(qc, kg, vg, valid, scale, acc)
        empty = ~valid.any(dim=-1)
        out[sel] = o.masked_fill(empty[..., None], 0.0).view(len(sel), block_size, d).to(q.dtype)
        lse[sel] = chunk_lse.masked_fill(empty, float("-inf")).view(len(sel), block_size)
        start = stop
    out = out.view(bsz, hq, nqb * block_size, d)[:, :, :nq].contiguous()
    lse = lse.view(bsz, hq, nqb * block_size)[:, :, :nq].contiguous()
    return out, lse


def block_sparse_attention_torch(q, k, v, block_index, block_count, *, scale, causal, block_size, return_lse):
    if q.device.type == "cpu":
        nqb = math.ceil(q.shape[2] / block_size)
        index = block_index.expand(q.shape[0], q.shape[1], nqb, block_index.shape[-1])
        count = block_count.expand(q.shape[0], q.shape[1], nqb)
        out, lse = _bucketed_cpu(q, k, v, index, count, scale=scale, causal=causal, block_size=block_size)
        return (out, lse) if return_lse else (out, None)
    bsz, hq, nq, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    group = hq // hkv
    nqb, nkb = math.ceil(nq / block_size), math.ceil(nk / block_size)
    max_kept = block_index.shape[-1]
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    index = block_index.expand(bsz, hq, nqb, max_kept).long()
    count = block_count.expand(bsz, hq, nqb).long()

    def blocks(x, n, nb):
        x = torch.nn.functional.pad(x, (0, 0, 0, nb * block_size - n))
        return x.view(x.shape[0], x.shape[1], nb, block_size, d)

    k_blocks, v_blocks = blocks(k, nk, nkb), blocks(v, nk, nkb)
    q_blocks = blocks(q, nq, nqb)
    out = torch.empty(bsz, hq, nqb, block_size, d, dtype=q.dtype, device=q.device)
    lse = torch.empty(bsz, hq, nqb, block_size, dtype=torch.float32, device=q.device)

    batch_ids = torch.arange(bsz, device=q.device)[:, None, None, None]
    kv_head_ids = (torch.arange(hq, device=q.device) // group)[None, :, None, None]
    slot = torch.arange(max_kept, device=q.device)
    in_block = torch.arange(block_size, device=q.device)
    bytes_per_qblock = bsz * hq * block_size * max_kept * block_size * torch.finfo(acc).bits // 8 * 3
    chunk = max(1, _CHUNK_BYTES // max(bytes_per_qblock, 1))
    tail = nk % block_size != 0
    for start in range(0, nqb, chunk):
        stop = min(start + chunk, nqb)
        c = stop - start
        ids = index[:, :, start:stop]  # (B, Hq, C, K)
        kg = k_blocks[batch_ids, kv_head_ids, ids].view(bsz * hq * c, 1, max_kept * block_size, d)
        vg = v_blocks[batch_ids, kv_head_ids, ids].view(bsz * hq * c, 1, max_kept * block_size, d)
        qc = q_blocks[:, :, start:stop].reshape(bsz * hq * c, 1, block_size, d)
        # Build a mask only when some key can be invalid: padded slots, the ragged tail, causal. On a GPU
        # always: asking would synchronise the host, which also rules out CUDA graph capture.
        valid = None
        if q.is_cuda or tail or causal or bool((count[:, :, start:stop] < max_kept).any()):
            key_pos = (ids[..., None] * block_size + in_block).view(bsz, hq, c, 1, max_kept * block_size)
            slot_ok = (slot < count[:, :, start:stop, None])[..., None].expand(-1, -1, -1, -1, block_size)
            valid = slot_ok.reshape(bsz, hq, c, 1, max_kept * block_size) & (key_pos < nk)
            if causal:
                query_pos = torch.arange(start, stop, device=q.device)[:, None] * block_size + in_block
                valid = valid & (key_pos <= query_pos[None, None, :, :, None] + (nk - nq))
            valid = valid.expand(bsz, hq, c, block_size, max_kept * block_size).reshape(
                bsz * hq * c, 1, block_size, max_kept * block_size
            )
        o, chunk_lse = _attend(qc, kg, vg, valid, scale, acc)
        if valid is not None:
            empty = ~valid.any(dim=-1)
            o = o.masked_fill(empty[..., None], 0.0)
            chunk_lse = chunk_lse.masked_fill(empty, float("-inf"))
        out[:, :, start:stop] = o.view(bsz, hq, c, block_size, d).to(q.dtype)
        lse[:, :, start:stop] = chunk_lse.view(bsz, hq, c, block_size)
    out = out.view(bsz, hq, nqb * block_size, d)[:, :, :nq].contiguous()
    lse = lse.view(bsz, hq, nqb * block_size)[:, :, :nq].contiguous()
    return (out, lse) if return_lse else (out, None)
