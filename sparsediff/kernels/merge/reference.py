"""Plain-PyTorch reference for the LSE merge of two attentions (float64), written for clarity, not speed."""

from __future__ import annotations

import torch


def merge_attention_ref(out_a, lse_a, out_b, lse_b):
    """Exact merge of two attentions over disjoint key sets, in float64."""
    la, lb = lse_a.double(), lse_b.double()
    lse = torch.logaddexp(la, lb)
    safe = lse.masked_fill(torch.isinf(lse), 0.0)
    wa = torch.exp(la - safe).masked_fill(torch.isinf(lse), 0.0)
    wb = torch.exp(lb - safe).masked_fill(torch.isinf(lse), 0.0)
    out = wa[..., None] * out_a.double() + wb[..., None] * out_b.double()
    return out.to(out_a.dtype), lse.float()
