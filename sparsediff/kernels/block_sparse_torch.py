"""Pure-PyTorch block-sparse attention: gathers the kept key blocks and works in chunks of query
blocks, so the Nq x Nk score matrix is never materialised. Used on CPU and wherever Triton cannot
run; computes in float32 (float64 for float64 inputs) and returns the input dtype.
"""

from __future__ import annotations

import math

import torch

# Bytes of scores one chunk may hold; bounds peak memory independently of sequence length.
_CHUNK_BYTES = 64 * 2**20


def block_sparse_attention_torch(q, k, v, block_index, block_count, *, scale, causal, block_size, return_lse):
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
    for start in range(0, nqb, chunk):
        stop = min(start + chunk, nqb)
        ids = index[:, :, start:stop]  # (B, Hq, C, K)
        kg = k_blocks[batch_ids, kv_head_ids, ids].to(acc)  # (B, Hq, C, K, bs, D)
        vg = v_blocks[batch_ids, kv_head_ids, ids].to(acc)
        c = stop - start
        kg = kg.view(bsz, hq, c, max_kept * block_size, d)
        vg = vg.view(bsz, hq, c, max_kept * block_size, d)
        scores = torch.matmul(q_blocks[:, :, start:stop].to(acc), kg.transpose(-1, -2)) * scale
        key_pos = (ids[..., None] * block_size + in_block).view(bsz, hq, c, 1, max_kept * block_size)
        valid = (slot < count[:, :, start:stop, None])[..., None].expand(-1, -1, -1, -1, block_size)
        valid = valid.reshape(bsz, hq, c, 1, max_kept * block_size) & (key_pos < nk)
        if causal:
            query_pos = (torch.arange(start, stop, device=q.device)[:, None] * block_size + in_block)
            valid = valid & (key_pos <= query_pos[None, None, :, :, None] + (nk - nq))
        scores = scores.masked_fill(~valid, float("-inf"))
        chunk_lse = torch.logsumexp(scores, dim=-1)
        probs = torch.exp(scores - chunk_lse.masked_fill(torch.isinf(chunk_lse), 0.0)[..., None])
        out[:, :, start:stop] = torch.matmul(probs, vg).to(q.dtype)
        lse[:, :, start:stop] = chunk_lse
    out = out.view(bsz, hq, nqb * block_size, d)[:, :, :nq].contiguous()
    lse = lse.view(bsz, hq, nqb * block_size)[:, :, :nq].contiguous()
    return (out, lse) if return_lse else (out, None)
