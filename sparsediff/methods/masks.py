"""Reading the attention masks hosts pass, and running a method per batch row on its valid tokens.

A method takes whole sequences and knows only "causal" or "bidirectional"; a padded batch hands the host a
mask instead (bool, or additive float with 0 / very negative entries). When that mask is the plain pattern
plus a per-row set of valid keys, each row can run alone on its valid tokens, which is the same attention.
Anything else (sliding windows, image-bidirectional blocks, packed sequences, biases) is reported as
unsupported and the host runs dense attention. Both host adapters (diffusers processors, transformers
attention functions) read masks and run padded rows through this module.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .dense import dense_attention

# Rows of the mask compared per chunk: the full (Nq, Nk) comparison at 64k would need gigabytes.
_CHECK_ROWS = 2048


def to_bool_mask(mask: torch.Tensor) -> torch.Tensor | None:
    """A boolean "may attend" view of a bool or additive float mask; None when the float mask holds
    biases (values other than 0 and very negative)."""
    if mask.dtype == torch.bool:
        return mask
    if not mask.dtype.is_floating_point:
        return mask != 0
    allowed = mask == 0
    blocked = mask <= torch.finfo(mask.dtype).min / 2
    if not bool((allowed | blocked).all()):
        return None
    return allowed


def key_padding(mask: torch.Tensor, batch: int, nk: int) -> torch.Tensor | None:
    """``(B, Nk)`` valid keys when ``mask`` ``(B or 1, 1, 1, Nk)`` masks keys only (the same for every query
    row and head), else None."""
    if mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[2] != 1 or mask.shape[-1] != nk:
        return None
    allowed = to_bool_mask(mask)
    return None if allowed is None else allowed[:, 0, 0].expand(batch, nk)


def key_validity(mask: torch.Tensor | None, nq: int, nk: int, causal: bool) -> torch.Tensor | None | bool:
    """Per-row valid keys ``(B, Nk)`` when a full ``(B, H or 1, Nq, Nk)`` ``mask`` is the plain causal /
    bidirectional pattern plus key padding; ``None`` when there is no mask; ``False`` when the mask is
    anything else. Causal masks are end-aligned: query ``i`` sits at key position ``i + Nk - Nq``."""
    if mask is None:
        return None
    if mask.dim() != 4 or mask.shape[-2] != nq or mask.shape[-1] != nk:
        return False
    mask = to_bool_mask(mask)
    if mask is None:
        return False
    if mask.shape[1] != 1 and not bool((mask == mask[:, :1]).all()):
        return False
    mask = mask[:, 0]  # (B, Nq, Nk)
    valid = mask[:, -1, :]  # the last query row sees every valid key under both patterns
    cols = torch.arange(nk, device=mask.device)
    for start in range(0, nq, _CHECK_ROWS):
        rows = mask[:, start:start + _CHECK_ROWS, :]
        if causal:
            pos = torch.arange(start, start + rows.shape[1], device=mask.device) + (nk - nq)
            expected = (cols[None, :] <= pos[:, None])[None] & valid[:, None, :]
        else:
            expected = valid[:, None, :].expand_as(rows)
        if not bool((rows == expected).all()):
            return False
    return valid


def row_slices(valid_row: torch.Tensor):
    """``slice`` when the valid entries of a row are one contiguous run (left or right padding), else the
    index tensor of the valid entries (a gather)."""
    idx = valid_row.nonzero().flatten()
    if idx.numel() == 0:
        return idx
    first, last = int(idx[0]), int(idx[-1])
    if last - first + 1 == idx.numel():
        return slice(first, last + 1)
    return idx


RowRun = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]


def run_per_row(run: RowRun, q, k, v, valid: torch.Tensor, *, causal: bool, scale=None, global_tokens: int = 0):
    """Attention of a padded batch, each row on its own valid tokens.

    ``valid`` ``(B, Nk)``: the valid keys; the queries are the last ``Nq`` tokens (their own keys; a cached
    prefix comes first when ``Nk > Nq``), valid where their key is. ``run(b, q_b, k_b, v_b, global_tokens_b)``
    computes row ``b`` on its valid queries and keys (``global_tokens_b``: how many of the first
    ``global_tokens`` keys are valid). Causal: compaction keeps end-aligned causality; query rows on padding
    see no key and get zeros. Bidirectional: query rows on padding still attend the valid keys, as under SDPA
    with a key-padding mask (dense: they are outside the method's sequence)."""
    nq, nk = q.shape[2], k.shape[2]
    out = q.new_zeros(*q.shape[:3], v.shape[-1])
    for b in range(q.shape[0]):
        own = valid[b, nk - nq:]
        keys, rows = row_slices(valid[b]), row_slices(own)
        kb, vb = k[b:b + 1, :, keys], v[b:b + 1, :, keys]
        if kb.shape[2] == 0:
            continue
        qb = q[b:b + 1, :, rows]
        if qb.shape[2]:
            text = int(valid[b, :global_tokens].sum()) if global_tokens else 0
            out[b:b + 1, :, rows] = run(b, qb, kb, vb, text).to(out.dtype)
        if not causal and not bool(own.all()):
            pad = (~own).nonzero().squeeze(1)
            out[b:b + 1, :, pad] = dense_attention(q[b:b + 1, :, pad], kb, vb, scale=scale).to(out.dtype)
    return out
