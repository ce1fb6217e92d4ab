"""One-pass quantization of q, k, v for the 8-bit kernel: INT8 per token or FP8 e4m3 per tile of tokens.

``quantize_tiles`` is the PyTorch definition (and the path off Triton); ``quantize`` does the same in one
Triton launch per tensor, reading the 16-bit input once: the PyTorch path makes float32 copies and takes
about eight passes over each tensor, which at 64k tokens costs a sizeable share of the attention itself.
Options of the launch, both for the keys' smoothing (``eight_bit.py``):

* ``subtract``: a per-head float32 vector removed from every token before quantizing (the key mean);
* ``dot_with``: a per-head float32 vector dotted with every token (unquantized), written as a side output
  (the queries' ``q·mean(k)``, which corrects the LSE).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
INT8_MAX = 127.0


def quantize_tiles(x: torch.Tensor, rows: int, dtype=FP8) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x8, scale)``: ``x`` ``(B, H, N, D)`` in e4m3 (or int8) with one float32 scale per tile of ``rows``
    tokens, ``scale`` ``(B, H, ceil(N / rows))``; ``x ≈ x8 · scale`` tile by tile."""
    b, h, n, d = x.shape
    tiles = math.ceil(n / rows)
    padded = torch.nn.functional.pad(x.float(), (0, 0, 0, tiles * rows - n)).view(b, h, tiles, rows, d)
    top = FP8_MAX if dtype == FP8 else INT8_MAX
    scale = (padded.abs().amax(dim=(3, 4)) / top).clamp_min(torch.finfo(torch.float32).tiny)
    scaled = padded / scale[..., None, None]
    x8 = (scaled.to(FP8) if dtype == FP8 else scaled.round().clamp(-127, 127).to(torch.int8))
    return x8.view(b, h, tiles * rows, d)[:, :, :n], scale.contiguous()


@triton.jit
def round_to_e4m3(y):
    """``y`` (float32, |y| <= 448) rounded onto e4m3's grid (3 mantissa bits, subnormal step 2^-9), so that the
    cast to e4m3 after it is exact: the Triton interpreter's own fp32 -> e4m3 cast drops the carry when a value
    rounds up to a power of two (31.9 -> 16), which hardware does not."""
    mag = tl.abs(y)
    step = tl.math.exp2(tl.maximum(tl.floor(tl.math.log2(tl.maximum(mag, 1e-30))), -6.0) - 3.0)
    return tl.where(y >= 0, 1.0, -1.0) * tl.minimum(tl.floor(mag / step + 0.5) * step, 448.0)


@triton.jit
def _quantize_fwd(
    X, Sub, DotVec, X8, Scale, DotOut,
    stride_xb, stride_xh, stride_xn, stride_xd,
    num_heads, vec_group, n, n_pad,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, ROWS: tl.constexpr, PER_TILE: tl.constexpr,
    PER_CHANNEL: tl.constexpr, INT8: tl.constexpr, SUBTRACT: tl.constexpr, DOT: tl.constexpr,
    TRANSPOSE: tl.constexpr,
):
    # One program: ROWS tokens of one head. PER_TILE: one scale for the ROWS tokens; PER_CHANNEL: the given
    # (B, H, D) scales in Scale, one per channel over all tokens; else one per token.
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // num_heads
    h = pid_bh % num_heads
    offs_n = pid_n * ROWS + tl.arange(0, ROWS)
    offs_d = tl.arange(0, BLOCK_D)
    ok = (offs_n[:, None] < n) & (offs_d[None, :] < HEAD_DIM)
    x = tl.load(X + b * stride_xb + h * stride_xh + offs_n[:, None] * stride_xn + offs_d[None, :] * stride_xd,
                mask=ok, other=0.0).to(tl.float32)
    vec_row = (b * (num_heads // vec_group) + h // vec_group) * HEAD_DIM  # the (B, H // vec_group, D) vectors
    if DOT:
        w = tl.load(DotVec + vec_row + offs_d, mask=offs_d < HEAD_DIM, other=0.0)
        tl.store(DotOut + pid_bh * n + offs_n, tl.sum(x * w[None, :], 1), mask=offs_n < n)
    if SUBTRACT:
        mu = tl.load(Sub + vec_row + offs_d, mask=offs_d < HEAD_DIM, other=0.0)
        x = tl.where(ok, x - mu[None, :], 0.0)
    top = 127.0 if INT8 else 448.0
    if PER_CHANNEL:
        scale = tl.load(Scale + pid_bh * HEAD_DIM + offs_d, mask=offs_d < HEAD_DIM, other=1.0)
        y = x / scale[None, :]
    elif PER_TILE:
        scale = tl.maximum(tl.max(tl.max(tl.abs(x), 1), 0) / top, 1.1754943508222875e-38)
        y = x / scale
        tl.store(Scale + pid_bh * tl.cdiv(n, ROWS) + pid_n, scale)
    else:
        scale = tl.maximum(tl.max(tl.abs(x), 1) / top, 1.1754943508222875e-38)
        y = x / scale[:, None]
        tl.store(Scale + pid_bh * n + offs_n, scale, mask=offs_n < n)
    if INT8:  # round half away from zero (the float -> int cast truncates)
        y = tl.where(y >= 0, tl.floor(y + 0.5), tl.ceil(y - 0.5))
        y = tl.minimum(tl.maximum(y, -127.0), 127.0)
    else:
        y = round_to_e4m3(y)
    if TRANSPOSE:  # (B, H, D, n_pad): tokens contiguous, as an 8-bit wgmma wants V
        out_ptrs = X8 + pid_bh * HEAD_DIM * n_pad + offs_d[None, :] * n_pad + offs_n[:, None]
    else:
        out_ptrs = X8 + pid_bh * n * HEAD_DIM + offs_n[:, None] * HEAD_DIM + offs_d[None, :]
    tl.store(out_ptrs, y.to(X8.dtype.element_ty), mask=ok)


def quantize(x: torch.Tensor, rows: int, dtype=torch.int8, *, subtract: torch.Tensor | None = None,
             dot_with: torch.Tensor | None = None, per_channel: bool = False, transpose: bool = False):
    """``(x8, scale, dot)``: ``x`` ``(B, H, N, D)`` 16/32-bit -> contiguous int8 or e4m3 ``x8`` with float32
    scales, one per token (``rows=1``, shape ``(B, H, N)``) or per tile of ``rows`` tokens (``(B, H, ceil(N /
    rows))``, ``rows`` a power of two). ``subtract`` / ``dot_with``: ``(B, H', D)`` float32 vectors, ``H % H' ==
    0`` (head ``h`` uses vector ``h // (H / H')``); ``dot`` is ``x · dot_with`` per token ``(B, H, N)`` float32
    (before ``subtract``), or None. Same numbers as :func:`quantize_tiles` up to rounding ties.
    ``per_channel``: instead one scale per channel over all tokens, ``(B, H, D)`` (``rows`` then only sets the
    launch's tile): it factors out of a sum over tokens, e.g. P·V, so a kernel applies it once at the end.
    ``transpose``: ``x8`` as a ``(B, H, D, N)`` view with tokens contiguous (rows padded to 16 bytes for TMA)."""
    b, h, n, d = x.shape
    if dtype not in (torch.int8, FP8):
        raise TypeError(f"quantize: dtype must be torch.int8 or torch.float8_e4m3fn, got {dtype}")
    if rows < 1 or rows & (rows - 1):
        raise ValueError(f"quantize: rows must be a power of two, got {rows}")
    if per_channel and subtract is not None:
        raise ValueError("quantize: per_channel scales are taken before subtract; use one or the other")
    vecs = [t for t in (subtract, dot_with) if t is not None]
    heads_vec = vecs[0].shape[1] if vecs else h
    for t in vecs:
        if t.shape != (b, heads_vec, d) or t.dtype != torch.float32 or h % heads_vec:
            raise ValueError(f"quantize: subtract / dot_with must be float32 (B, H', D) with H % H' == 0, got "
                             f"{tuple(t.shape)} {t.dtype} for x {tuple(x.shape)}")
    n_pad = -(-n // 16) * 16
    x8 = torch.empty(b, h, d, n_pad, dtype=dtype, device=x.device) if transpose else \
        torch.empty(b, h, n, d, dtype=dtype, device=x.device)
    block_rows = rows if rows > 1 else max(1, min(64, 8192 // triton.next_power_of_2(d)))
    if per_channel:  # one reduction pass for the channels' range, then the quantizing pass
        top = INT8_MAX if dtype == torch.int8 else FP8_MAX
        scale = (x.abs().amax(dim=2).float() / top).clamp_min(torch.finfo(torch.float32).tiny).contiguous()
    else:
        scale = torch.empty(b, h, math.ceil(n / rows), dtype=torch.float32, device=x.device)
    dot = torch.empty(b, h, n, dtype=torch.float32, device=x.device) if dot_with is not None else None
    dummy = scale
    grid = (math.ceil(n / block_rows), b * h)
    _quantize_fwd[grid](
        x, subtract.contiguous() if subtract is not None else dummy,
        dot_with.contiguous() if dot_with is not None else dummy, x8, scale, dot if dot is not None else dummy,
        *x.stride(), h, h // heads_vec, n, n_pad,
        HEAD_DIM=d, BLOCK_D=max(16, triton.next_power_of_2(d)), ROWS=block_rows, PER_TILE=rows > 1 and not per_channel,
        PER_CHANNEL=per_channel, TRANSPOSE=transpose,
        INT8=dtype == torch.int8, SUBTRACT=subtract is not None, DOT=dot_with is not None,
        num_warps=4,
    )
    return (x8[..., :n] if transpose else x8), scale, dot


def quantize_qk(q: torch.Tensor, k: torch.Tensor, with_shift: bool, k_rows: int = 1):
    """Q·Kᵀ in INT8 as both 8-bit kernels take it: ``(q8, q_scale, k8, k_scale, shift)`` with per-token scales
    (keys: one per tile of ``k_rows`` tokens), keys smoothed by their per-head mean, and ``shift = q·mean(k)`` per
    query (``(B, Hq, N)``; None without ``with_shift``), by which the kernel's LSE is corrected (times the softmax
    scale)."""
    key_mean = k.mean(dim=2, dtype=torch.float32)  # (B, Hkv, D)
    q8, q_scale, shift = quantize(q, 1, torch.int8, dot_with=key_mean if with_shift else None)
    k8, k_scale, _ = quantize(k, k_rows, torch.int8, subtract=key_mean)
    return q8, q_scale, k8, k_scale, shift
