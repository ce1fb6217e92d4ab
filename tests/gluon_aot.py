"""Compile the Gluon kernel for sm_90a without a GPU and print what the tests check, as one JSON line.

    python tests/gluon_aot.py WORKDIR '[[128, "bfloat16", true, true, false, false, false], ...]'
    (head dim, dtype, even N, write LSE, causal, live rows, INT8 Q·Kᵀ, FP8 P·V[, tile k][, {schedule options}])

Run without TRITON_INTERPRET (Gluon has no interpreter). The Triton wheel ships ptxas and cuobjdump.
"""

import json
import subprocess
import sys
from pathlib import Path

import torch
from triton.backends.compiler import GPUTarget
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
from triton.runtime import driver

from sparsediff.kernels.block_sparse import gluon as G


class Sm90Target:
    """Stands in for the CUDA driver so the JIT compiles for sm_90a."""

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0


def compile_variant(d, dtype_name, even_n, write_lse, causal, has_live=False, int8_qk=False, fp8_pv=False,
                    tile_k=True, **schedule):
    dtype = getattr(torch, dtype_name)
    x = torch.empty(1, 2, 512, d, dtype=dtype)
    x8 = torch.empty(1, 2, 512, d, dtype=torch.int8) if int8_qk else x  # q and k in INT8
    v = torch.empty(1, 2, d, 512, dtype=torch.float8_e4m3fn) if fp8_pv else x  # v in e4m3, (B, H, D, N)
    out, lse = torch.empty_like(x), torch.empty(1, 2, 512)
    q_block, kv_block = [1, 1, G.ROWS_PER_WARPGROUP, d], [1, 1, G.BLOCK_SIZE, d]

    def desc(t, block):
        return TensorDescriptor(t, list(t.shape), list(t.stride()), block,
                                gl.NVMMASharedLayout.get_default_for(block, G._GL_DTYPES[t.dtype]))
    index = torch.zeros(1, 1, 4, 4, dtype=torch.int32)
    count = torch.zeros(1, 1, 4, dtype=torch.int32)
    cfg = G.resolve_schedule({**schedule, "int8_tile_k": tile_k}, eight_bit=int8_qk, fp8_pv=fp8_pv)
    return G._block_sparse_fwd_gluon.warmup(
        desc(x8, q_block), desc(x8, kv_block), desc(v, [1, 1, d, G.BLOCK_SIZE] if fp8_pv else kv_block), out, lse,
        index, count, 0, 0, 16, 1, 0, 0, 4,
        *out.stride()[:3], 2, 1, 512, 512, 0.1, 0, 4, count, lse, lse, lse, HEAD_DIM=d, STAGES=cfg["stages"],
        PINGPONG=cfg["pingpong"], OVERLAP=cfg["overlap"], WRITE_LSE=write_lse, CONSUMER_REGS=cfg["consumer_regs"],
        LOADER_REGS=cfg["loader_regs"], EVEN_N=even_n, CAUSAL=causal, HAS_LIVE=has_live, INT8_QK=int8_qk,
        FP8_PV=fp8_pv, TILE_K=tile_k, PREFETCH=cfg["prefetch_ids"], POLY=cfg["exp2_poly"],
        P_SHARED=cfg["fp8_p_shared"], TREE=cfg["tree_reduce"], PAIR=cfg["pair_tiles"],
        num_warps=4, maxnreg=G.kernel_maxnreg(cfg),
        grid=(1,))


def main():
    workdir, variants = Path(sys.argv[1]), json.loads(sys.argv[2])
    cuobjdump = Path(sys.modules["triton.backends.nvidia"].__file__).parent / "bin" / "cuobjdump"
    driver.set_active(Sm90Target())
    results = []
    for i, variant in enumerate(variants):
        *args, schedule = variant if isinstance(variant[-1], dict) else (*variant, {})
        kernel = compile_variant(*args, **schedule)
        ptx = kernel.asm["ptx"]
        cubin = workdir / f"kernel{i}.cubin"
        cubin.write_bytes(kernel.asm["cubin"])
        usage = subprocess.run([str(cuobjdump), "--dump-resource-usage", str(cubin)], capture_output=True,
                               text=True, check=True).stdout
        results.append({
            "variant": variant, "ptx_head": ptx[:2000], "setmaxnreg": "setmaxnreg" in ptx,
            "wgmma": ptx.count("wgmma.mma_async"), "tma_4d": ptx.count("cp.async.bulk.tensor.4d"),
            "shared": kernel.metadata.shared, "usage": usage,
        })
    print(json.dumps(results))


if __name__ == "__main__":
    main()
