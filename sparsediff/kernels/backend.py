"""The one rule that picks a kernel's backend, shared by every op.

``backend=None``: the Triton kernel for CUDA tensors when Triton is installed and the op says its kernel applies
to these inputs (dtype, head dim, block size), else the PyTorch path. ``"triton"`` forces the kernel: it needs
the triton package, and CPU tensors need ``TRITON_INTERPRET=1`` (the interpreter the tests use). ``"torch"``
forces the PyTorch path. An op may accept more names (block-sparse attention's ``"gluon"``), listed in
``extra``; those are returned as given, after the Triton checks.
"""

from __future__ import annotations

import functools
import logging
import os

import torch

from .._logging import warn_once as _warn_once

logger = logging.getLogger("sparsediff.kernels")


def warn_once(message: str) -> None:
    _warn_once(logger, message)


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


@functools.lru_cache(maxsize=8)
def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (sizes persistent grids and key splits)."""
    return torch.cuda.get_device_properties(device).multi_processor_count


def interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def check_triton(x: torch.Tensor, op: str = "this op") -> None:
    """Raise when a forced Triton kernel cannot run on ``x``: no triton package, or CPU without the interpreter."""
    if not triton_available():
        raise RuntimeError(f"{op}: backend='triton' needs the triton package, which is not installed")
    if not x.is_cuda and not interpreted():
        raise ValueError(f"{op}: backend='triton' on CPU tensors needs TRITON_INTERPRET=1 (the Triton interpreter)")


def choose_backend(backend: str | None, x: torch.Tensor, *, applies: bool = True, op: str = "this op",
                   extra: tuple[str, ...] = ()) -> str:
    """``"triton"``, ``"torch"`` or one of ``extra`` for an op on ``x`` (see the module docstring).

    ``applies``: whether the op's Triton kernel takes these inputs; only consulted when ``backend`` is None."""
    allowed = (None, "triton", "torch", *extra)
    if backend not in allowed:
        raise ValueError(f"{op}: backend must be one of {', '.join(map(repr, allowed))}, got {backend!r}")
    if backend is None:
        return "triton" if (applies and x.is_cuda and triton_available()) else "torch"
    if backend != "torch":
        check_triton(x, op)
    return backend
