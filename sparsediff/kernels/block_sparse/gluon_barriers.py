"""Ring-stage waits and releases from every consumer thread, without the compiler's warpgroup barriers.

Triton 3.6 models an mbarrier arrive or wait as touching all of shared memory, so it puts a warpgroup-wide
``bar.sync`` before the K/V waits and before the stage release of every key block, and its arrive is issued by
one elected thread after that barrier. Here each of the 128 threads of a consumer warpgroup waits on and arrives
at the stage's mbarrier itself, in inline PTX that the barrier analysis does not see (the "empty" barriers
then count 2 x 128 arrivals, as CUTLASS's consumer release does). The PTX needs the barriers' shared-memory
offsets, which only the compiler's allocator knows: ``barrier_offsets`` reads them from a first compile of the
same kernel with the compiler's own barrier ops (the allocation does not depend on which of the two is used),
and the launcher checks that the second compile put them at the same place.
"""

from __future__ import annotations

import re

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier

THREADS = gl.constexpr(128)  # one consumer warpgroup
OFF = gl.constexpr(-1)  # a barrier offset that selects the compiler's own ops


@gluon.constexpr_function
def thread_layout():
    # One element per thread of a 4-warp partition: the inline PTX runs exactly once in each thread.
    return gl.BlockedLayout([1], [32], [4], [0])


@gluon.jit
def _stage_address(BASE: gl.constexpr, stage):
    # mbarriers of a [STAGES, 1] int64 allocation are 8 bytes apart
    return gl.full([THREADS], BASE, gl.int32, thread_layout()) + stage * 8


@gluon.jit
def wait_stage(bars, stage, phase, BASE: gl.constexpr):
    """Wait for phase ``phase`` of ``bars[stage]``: every thread polls, as the compiler's wait does."""
    if BASE == OFF:
        mbarrier.wait(bars.index(stage), phase)
    else:
        gl.inline_asm_elementwise(
            "{ .reg .pred done; .reg .u32 a; mov.u32 a, global_smem; add.u32 a, a, $1; "
            "poll: mbarrier.try_wait.parity.shared::cta.b64 done, [a], $2; @!done bra.uni poll; mov.b32 $0, 0; }",
            "=r,r,r", [_stage_address(BASE, stage), gl.full([THREADS], 0, gl.int32, thread_layout()) + phase],
            dtype=gl.int32, is_pure=False, pack=1)


@gluon.jit
def release_stage(bars, stage, BASE: gl.constexpr):
    """Arrive on ``bars[stage]`` once this warpgroup is done with the stage (its wgmma waits came before)."""
    if BASE == OFF:
        mbarrier.arrive(bars.index(stage))
    else:
        gl.inline_asm_elementwise(
            "{ .reg .u32 a; mov.u32 a, global_smem; add.u32 a, a, $1; "
            "mbarrier.arrive.shared::cta.b64 _, [a]; mov.b32 $0, 0; }",
            "=r,r", [_stage_address(BASE, stage)], dtype=gl.int32, is_pure=False, pack=1)


@gluon.constexpr_function
def release_count(BASE):
    """Arrivals that free a stage: one per consumer warpgroup, or one per consumer thread."""
    return 2 if BASE == OFF.value else 2 * THREADS.value


_SMEM_BASE = re.compile(r"mov\.(?:b32|u32)\s+(%r\d+),\s*global_smem;")
_ADD = re.compile(r"add\.(?:s32|u32)\s+(%r\d+),\s*(%r\d+),\s*(\d+);")
_INIT = re.compile(r"mbarrier\.init\.shared(?:::cta)?\.b64\s+\[([^\]]+)\],\s*(\d+);")


def barrier_offsets(ptx: str, stages: int) -> dict:
    """``{"K_BARS", "V_BARS", "EMPTY_BARS"}``: shared-memory offsets of the three ring-stage barrier arrays,
    read from the kernel's PTX. The kernel initialises q[0], turn[0], q[1], turn[1], then k[i], v[i], empty[i]
    for each stage, in that order; anything else is an error, never a guess."""
    bases = set(_SMEM_BASE.findall(ptx))
    offsets = {dst: int(off) for dst, src, off in _ADD.findall(ptx) if src in bases}
    offsets.update({b: 0 for b in bases})
    inits = []
    for operand, _count in _INIT.findall(ptx):
        operand = operand.strip()
        if operand in offsets:
            inits.append(offsets[operand])
        elif operand.startswith("global_smem"):
            inits.append(int(operand.partition("+")[2] or 0))
        else:
            raise RuntimeError(f"cannot resolve the shared address of mbarrier.init [{operand}]")
    if len(inits) != 4 + 3 * stages:
        raise RuntimeError(f"expected {4 + 3 * stages} mbarrier inits for {stages} stages, found {len(inits)}")
    ring = inits[4:]
    found = {"K_BARS": ring[0::3], "V_BARS": ring[1::3], "EMPTY_BARS": ring[2::3]}
    for name, offs in found.items():
        if offs != [offs[0] + 8 * i for i in range(stages)]:
            raise RuntimeError(f"{name} are not 8 bytes apart: {offs}")
    return {name: offs[0] for name, offs in found.items()}
