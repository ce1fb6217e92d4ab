"""Reading the 4-D masks transformers passes to attention functions.

A method takes a whole sequence and knows only "causal" or "bidirectional"; a batch with padding
hands us a 4-D mask instead. When that mask is exactly the causal (or bidirectional) pattern AND a
per-row set of valid keys, each row can run alone on its valid tokens, which is the same attention.
Anything else (sliding windows, image-bidirectional blocks, packed sequences, biases) is reported
as unsupported and the caller runs dense SDPA.
"""

from __future__ import annotations

import torch

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


def key_validity(mask: torch.Tensor | None, nq: int, nk: int, causal: bool) -> torch.Tensor | None | bool:
    """Per-row valid keys ``(B, Nk)`` when ``mask`` is the plain causal / bidirectional pattern plus
    key padding; ``None`` when there is no mask; ``False`` when the mask is anything else.

    Causal masks are end-aligned: query ``i`` sits at key position ``i + Nk - Nq``.
    """
    if mask is None:
        return None
    if mask.dim() != 4 or mask.shape[-2] != nq or mask.shape[-1] != nk:
        return False
    mask = to_bool_mask(mask)
    if mask is None:
        return False
    if mask.shape[1] != 1:
        if not bool((mask == mask[:, :1]).all()):
            return False
    mask = mask[:, 0]  # (B, Nq, Nk)
    # The last query row sees every valid key under both patterns.
    valid = mask[:, -1, :]
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
    """``slice`` when the valid keys of a row are one contiguous run (left or right padding),
    otherwise the index tensor of valid keys."""
    idx = valid_row.nonzero().flatten()
    if idx.numel() == 0:
        return idx
    first, last = int(idx[0]), int(idx[-1])
    if last - first + 1 == idx.numel():
        return slice(first, last + 1)
    return idx
