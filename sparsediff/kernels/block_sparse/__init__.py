"""Public entry point for block-sparse attention: input checks and backend choice."""

from __future__ import annotations

import functools
import math
import os

import torch

from ..backend import choose_backend, interpreted, triton_available, warn_once
from .pytorch import block_sparse_attention_torch

TRITON_DTYPES = (torch.float16, torch.bfloat16)
TORCH_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
MAX_TRITON_HEAD_DIM = 256
# "bf16": the 16-bit kernels on the inputs' dtype; "int8" / "int8_fp8": kernels/block_sparse/eight_bit.py
PRECISIONS = ("bf16", "int8", "int8_fp8")


# Why a Gluon variant could not be built here, once it failed: "16-bit" or "8-bit" (each falls back on its own).
_gluon_failures: dict[str, str | None] = {"16-bit": None, "8-bit": None}


def gluon_enabled(variant: str = "16-bit") -> bool:
    """The Hopper Gluon kernel is used where it applies unless ``SPARSEDIFF_GLUON=0`` or this variant failed to
    build (e.g. a Triton release whose Gluon API differs from the tested 3.6). ``SPARSEDIFF_GLUON_INT8=0`` keeps the
    8-bit precisions on the Triton 8-bit kernel (on an H100 the Gluon one is 1.2-2.4x faster, 2026-12-07)."""
    if os.environ.get("SPARSEDIFF_GLUON", "1") == "0" or not triton_available() or _gluon_failures[variant]:
        return False
    if variant == "8-bit" and os.environ.get("SPARSEDIFF_GLUON_INT8", "1") == "0":
        return False
    try:
        from triton.experimental import gluon  # noqa: F401
    except ImportError:
        return False
    return True


def _use_gluon(forced: bool, wanted: bool, q, k, v, block_size: int, what: str) -> bool:
    """Whether the Gluon kernel runs this call: ``forced`` (backend="gluon") raises where it does not apply."""
    if not (forced or wanted):
        return False
    from .gluon import gluon_support_error

    problem = gluon_support_error(q, k, v, block_size=block_size)
    if forced and problem:
        raise ValueError(f"backend='gluon'{what}: {problem}")
    return problem is None


def _gluon_failed(err: Exception, forced: bool, variant: str) -> None:
    """A Gluon build failure: re-raise if asked for Gluon or the GPU failed, else the Triton kernel from now on."""
    if forced or "CUDA error" in str(err):
        raise err
    _gluon_failures[variant] = f"{type(err).__name__}: {str(err).strip().splitlines()[-1] if str(err).strip() else ''}"
    warn_once(f"block_sparse_attention: the {variant} Gluon kernel could not be built ({_gluon_failures[variant]}); "
              f"using the {variant} Triton kernel from now on")


def resolve_backend(backend: str | None, q: torch.Tensor, block_size: int | None = None) -> str:
    """The backend rule of ``kernels.backend`` for this op: Triton for fp16/bf16 CUDA tensors with a head dim
    that is a multiple of 8 up to 256 and a power-of-two ``block_size`` >= 16 (the caller may still pick the
    Gluon kernel for the Triton case); "gluon" is checked by the caller, which knows the full shape."""
    if backend == "gluon":
        return backend
    d = q.shape[-1]
    pow2 = block_size is None or (isinstance(block_size, int) and block_size >= 16
                                  and not block_size & (block_size - 1))
    fits = q.dtype in TRITON_DTYPES and d <= MAX_TRITON_HEAD_DIM and d % 8 == 0 and pow2
    chosen = choose_backend(backend, q, applies=fits, op="block_sparse_attention", extra=("gluon",))
    if backend is None and chosen == "torch" and q.is_cuda and triton_available():
        warn_once(f"block_sparse_attention: Triton supports {TRITON_DTYPES} with head dims that are multiples of 8 "
                  f"up to {MAX_TRITON_HEAD_DIM} and power-of-two blocks >= 16; got {q.dtype}, head dim {d}, block "
                  f"{block_size}: using the slower PyTorch path")
    return chosen


@functools.lru_cache(maxsize=64)
def _block_starts(num_blocks: int, q_tiles: int, block_size: int, device) -> torch.Tensor:
    """The first row of q each query block reads (block ``i`` reads q's block ``i % q_tiles``)."""
    return (torch.arange(num_blocks, device=device) % q_tiles) * block_size


def check_inputs(q, k, v, block_index, block_count, block_size, backend, check_ids=True, repeat_q=1):
    """Raise a ValueError/TypeError that names the problem; never let a bad input through."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must have shape (B, H, N, D), got {tuple(t.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if q.shape[0] != k.shape[0] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must share batch size and head dim")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"query heads ({q.shape[1]}) must be a multiple of key/value heads ({k.shape[1]})")
    if not (q.device == k.device == v.device == block_index.device == block_count.device):
        raise ValueError(
            f"all inputs must be on one device, got q:{q.device} k:{k.device} v:{v.device} "
            f"block_index:{block_index.device} block_count:{block_count.device}"
        )
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    supported = TORCH_DTYPES if backend == "torch" else TRITON_DTYPES
    if q.dtype not in supported:
        raise TypeError(f"the {backend} backend supports dtypes {supported}, got {q.dtype}")
    if backend in ("triton", "gluon"):
        d = q.shape[-1]
        if d > MAX_TRITON_HEAD_DIM or d % 8:
            raise ValueError(f"the Triton backend supports head dims that are multiples of 8 up to 256, got {d}")
        if block_size < 16 or block_size & (block_size - 1):
            raise ValueError(f"the Triton backend needs a power-of-two block_size >= 16, got {block_size}")
    if not isinstance(block_size, int) or block_size <= 0:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    for name, t, rank in (("block_index", block_index, 4), ("block_count", block_count, 3)):
        if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
            raise TypeError(f"{name} must be an integer tensor (int32), got {t.dtype}")
        if t.dim() != rank:
            raise ValueError(f"{name} must have {rank} dims, got shape {tuple(t.shape)}")
    bsz, hq, nq, _ = q.shape
    if not isinstance(repeat_q, int) or repeat_q < 1:
        raise ValueError(f"repeat_q must be a positive int, got {repeat_q!r}")
    if repeat_q > 1 and nq % block_size:
        raise ValueError(f"repeat_q > 1 needs Nq ({nq}) to be a multiple of block_size ({block_size})")
    nq *= repeat_q
    nqb, nkb = math.ceil(nq / block_size), math.ceil(k.shape[2] / block_size)
    for name, t in (("block_index", block_index), ("block_count", block_count)):
        if t.shape[0] not in (1, bsz) or t.shape[1] not in (1, hq) or t.shape[2] != nqb:
            raise ValueError(
                f"{name} must have shape (B or 1, Hq or 1, ceil(Nq/block_size)={nqb}, ...), got {tuple(t.shape)}"
            )
    if block_index.shape[:2] != block_count.shape[:2]:
        raise ValueError(
            f"block_index {tuple(block_index.shape)} and block_count {tuple(block_count.shape)} "
            "must agree on their batch and head dims"
        )
    if not check_ids or block_count.numel() == 0:
        return
    max_kept = block_index.shape[-1]
    bad_count = (block_count < 0) | (block_count > max_kept)
    valid = torch.arange(max_kept, device=block_index.device) < block_count[..., None]
    bad_id = valid & ((block_index < 0) | (block_index >= nkb))
    if bool(bad_count.any()):
        raise ValueError(f"block_count values must lie in [0, {max_kept}] (block_index's last dim)")
    if bool(bad_id.any()):
        raise ValueError(f"block_index holds key-block ids outside [0, {nkb}) in its valid slots")


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_index: torch.Tensor,
    block_count: torch.Tensor,
    *,
    scale: float | None = None,
    causal: bool = False,
    block_size: int = 128,
    return_lse: bool = False,
    backend: str | None = None,
    check_ids: bool = True,
    repeat_q: int = 1,
    live_rows: torch.Tensor | None = None,
    precision: str = "bf16",
):
    """Attention of each query block to the key blocks it keeps.

    Args:
        q: ``(B, Hq, Nq, D)``; k, v: ``(B, Hkv, Nk, D)`` with ``Hq % Hkv == 0`` (GQA / MQA).
        block_index: int32 ``(B or 1, Hq or 1, ceil(Nq/block_size), max_kept)``, the kept key-block ids
            of each query block; only the first ``block_count`` slots of a row are read.
        block_count: int32 ``(B or 1, Hq or 1, ceil(Nq/block_size))``.
        causal: mask inside blocks as ``scaled_dot_product_attention(is_causal=True)`` does, aligned to
            the end when ``Nq != Nk``: query ``i`` sees keys ``j <= i + Nk - Nq`` (a prefix cache).
        backend: None picks the fastest kernel that applies: on an H100/H200 the warp-specialized Gluon
            kernel (head dim 64/128, ``block_size`` 128; ``SPARSEDIFF_GLUON=0`` turns it
            off), else Triton for fp16/bf16 CUDA tensors, and the PyTorch path elsewhere. "gluon",
            "triton" or "torch" forces one ("triton" on CPU needs ``TRITON_INTERPRET=1``).
        check_ids: validate block ids and counts (one device sync); callers that built the index
            themselves may skip it.
        repeat_q: attend as if q were ``q.repeat(1, 1, repeat_q, 1)`` (Nq a multiple of ``block_size``;
            not causal), without making the copy: query block ``i`` reads q's block ``i % (Nq / block_size)``.
            Split prefix attention runs one query block against several key chunks this way.
        live_rows: int32 ``(B,)``, optional: only rows ``< live_rows[b]`` of q (before ``repeat_q``) are
            needed, read on the device (no sync). A query block with none of them keeps no key (zeros and
            ``-inf``, no loads) on every backend; the Gluon kernel also skips the GEMMs of a 64-row half
            with none, the Triton kernel of a row tile (zeros and ``-inf`` too). Rows below it are the same
            with or without it.
        precision: "bf16" (default): the kernels above on the inputs' own dtype; "int8": Q·Kᵀ in INT8 with
            per-token scales and key smoothing, P·V in 16-bit; "int8_fp8": P·V in FP8 e4m3 too
            (``kernels/block_sparse/eight_bit.py``). The 8-bit paths are Triton only (on CPU under
            ``TRITON_INTERPRET=1``), without ``repeat_q`` / ``live_rows``.

    Returns:
        ``out`` in the input dtype, and with ``return_lse`` the natural-log LSE ``(B, Hq, Nq)`` in
        float32. A query row that keeps no key (or sees none under the causal mask) gets zeros and
        ``lse = -inf``.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision != "bf16":
        return _eight_bit(precision, q, k, v, block_index, block_count, scale=scale, causal=causal,
                          block_size=block_size, return_lse=return_lse, backend=backend, check_ids=check_ids,
                          repeat_q=repeat_q, live_rows=live_rows)
    requested = backend
    backend = resolve_backend(backend, q, block_size) if isinstance(q, torch.Tensor) else backend
    check_inputs(q, k, v, block_index, block_count, block_size, backend, check_ids=check_ids, repeat_q=repeat_q)
    if repeat_q > 1 and causal:
        raise ValueError("repeat_q > 1 is for non-causal attention only")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    block_index = block_index.to(torch.int32)
    block_count = block_count.to(torch.int32)
    if live_rows is not None and (live_rows.dtype != torch.int32 or tuple(live_rows.shape) != (q.shape[0],)
                                  or live_rows.device != q.device):
        raise ValueError(f"live_rows must be an int32 ({q.shape[0]},) tensor on {q.device}, got {live_rows.dtype} "
                         f"{tuple(live_rows.shape)} on {live_rows.device}")
    if backend in ("triton", "gluon"):
        if q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:
            q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        use_gluon = _use_gluon(backend == "gluon", requested is None and gluon_enabled(), q, k, v, block_size, "")
        if use_gluon:
            try:
                from .gluon import block_sparse_attention_gluon

                out, lse = block_sparse_attention_gluon(q, k, v, block_index, block_count, scale=scale,
                                                        return_lse=return_lse, causal=causal, repeat_q=repeat_q,
                                                        live_rows=live_rows)
            except Exception as err:  # a build failure: fall back, unless asked for Gluon or the GPU failed
                _gluon_failed(err, requested == "gluon", "16-bit")
                use_gluon = False
        if not use_gluon:
            from .triton import block_sparse_attention_triton

            out, lse = block_sparse_attention_triton(
                q, k, v, block_index, block_count, scale=scale, causal=causal, block_size=block_size,
                return_lse=return_lse, repeat_q=repeat_q, live_rows=live_rows,
            )
    else:
        if live_rows is not None:  # query blocks past the live rows keep nothing, as on the GPU kernels
            starts = _block_starts(block_count.shape[2], math.ceil(q.shape[2] / block_size), block_size, q.device)
            block_count = torch.where(starts < live_rows[:, None, None], block_count, 0)
        if repeat_q > 1:  # the reference path makes the copy
            q = q.repeat(1, 1, repeat_q, 1)
        out, lse = block_sparse_attention_torch(
            q, k, v, block_index, block_count, scale=scale, causal=causal, block_size=block_size,
            return_lse=return_lse,
        )
    return (out, lse) if return_lse else out


def eight_bit_unsupported(q: torch.Tensor, block_size: int) -> str | None:
    """Why the 8-bit kernels cannot run on ``q`` with ``block_size`` (None when they can): callers that may fall
    back to the 16-bit kernel ask first; :func:`block_sparse_attention` itself raises."""
    d = q.shape[-1]
    if not triton_available():
        return "the triton package is not installed"
    if not q.is_cuda and not interpreted():
        return "they run on CUDA (or on CPU under TRITON_INTERPRET=1)"
    if d > MAX_TRITON_HEAD_DIM or d % 16:
        return f"they need a head dim that is a multiple of 16 up to {MAX_TRITON_HEAD_DIM}, got {d}"
    if block_size < 16 or block_size & (block_size - 1):
        return f"they need a power-of-two block_size >= 16, got {block_size}"
    if not hasattr(torch, "float8_e4m3fn"):
        return "they need torch.float8_e4m3fn (torch >= 2.1)"
    return None


def _eight_bit(precision, q, k, v, block_index, block_count, *, scale, causal, block_size, return_lse, backend,
               check_ids, repeat_q, live_rows):
    if backend not in (None, "triton", "gluon"):
        raise ValueError(f"precision={precision!r} runs the 8-bit Triton or Gluon kernel (backend None, 'triton' or "
                         f"'gluon'), got {backend!r}")
    choose_backend("triton", q, op=f"block_sparse_attention(precision={precision!r})")
    if repeat_q != 1 or live_rows is not None:
        raise ValueError(f"precision={precision!r} does not support repeat_q or live_rows; use precision='bf16'")
    # Any float dtype goes in (it is quantized); the tile rules are the Triton kernel's.
    check_inputs(q, k, v, block_index, block_count, block_size, "torch", check_ids=check_ids)
    why = eight_bit_unsupported(q, block_size)  # the shape rules, shared with the methods' fallback
    if why is not None:
        raise ValueError(f"precision={precision!r} cannot run here: {why}")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    block_index, block_count = block_index.to(torch.int32), block_count.to(torch.int32)
    if _use_gluon(backend == "gluon", backend is None and gluon_enabled("8-bit"), q, k, v, block_size,
                  f" with precision={precision!r}"):
        try:
            from .gluon import block_sparse_attention_gluon_int8

            out, lse = block_sparse_attention_gluon_int8(q, k, v, block_index, block_count, scale=scale,
                                                         return_lse=return_lse, causal=causal,
                                                         pv_fp8=precision == "int8_fp8")
            return (out, lse) if return_lse else out
        except Exception as err:  # a build failure: the Triton 8-bit kernel from now on (16-bit Gluon unaffected)
            _gluon_failed(err, backend == "gluon", "8-bit")
    from .eight_bit import block_sparse_attention_8bit

    out, lse = block_sparse_attention_8bit(q, k, v, block_index, block_count, scale=scale, causal=causal,
                                           block_size=block_size, return_lse=return_lse,
                                           pv_8bit=precision == "int8_fp8")
    return (out, lse) if return_lse else out
