"""Programmatic dependent launch (PDL, Hopper and later) for chains of short kernels.

A kernel launched with PDL may be scheduled while the kernel before it in the stream is still running; it
waits (``griddepcontrol.wait``) for that kernel to finish and flush its writes before it touches memory, then
lets the next kernel launch. Results are unchanged: only the launch latency between kernels of a few
microseconds each (LoSA's cached step is a chain of them) is hidden. Every kernel that takes ``USE_PDL``
calls :func:`pdl_start` first, before any load, store or early return: a kernel that skipped the wait
could finish before the one it follows, and the kernel after it would then not wait for that one.

Experimental and off by default: ``SPARSEDIFF_PDL=1`` turns it on for the LoSA step kernels and the prefix
merge on CUDA devices of compute capability 9.0 or newer. Not under the Triton interpreter.
"""

from __future__ import annotations

import functools
import logging
import os

import torch
import triton
import triton.language as tl

logger = logging.getLogger(__name__)


@functools.lru_cache(maxsize=8)
def _capability(device) -> int:
    major = torch.cuda.get_device_capability(device)[0]
    if major < 9:  # once per device: SPARSEDIFF_PDL=1 asked for what this GPU cannot do
        logger.warning("SPARSEDIFF_PDL=1: programmatic dependent launch needs compute capability 9.0 or newer "
                       "(%s has %d.x); kernels launch without it", torch.cuda.get_device_name(device), major)
    return major


def pdl_enabled(x) -> bool:
    """Whether kernels on ``x``'s device launch with PDL: ``SPARSEDIFF_PDL=1``, CUDA, compute capability >= 9."""
    if os.environ.get("SPARSEDIFF_PDL", "0") != "1" or not x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1":
        return False
    return _capability(x.device) >= 9


def pdl_kwargs(x) -> dict:
    """Launch keywords of a kernel with a ``USE_PDL`` parameter: the constexpr and Triton's launch option."""
    use = pdl_enabled(x)
    return {"USE_PDL": use, "launch_pdl": use}


@triton.jit
def pdl_start(USE_PDL: tl.constexpr):
    """A kernel's first statement: wait for the kernel before (its writes visible), then let the next launch."""
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
