"""Compile every kernel that takes ``USE_PDL`` for sm_90a with programmatic dependent launch on, without a GPU,
through the public functions that launch them, and print what the tests check as one JSON line.

    python tests/pdl_aot.py

Run without TRITON_INTERPRET. Each kernel is compiled (Triton's ``warmup``), not launched: outputs are not
computed, so only the compiled code is checked.
"""

import json

import torch
from gluon_aot import Sm90Target
from triton.runtime import driver

from sparsediff.kernels import backend as kernel_backend
from sparsediff.kernels import pdl
from sparsediff.kernels.merge import prefix_triton as prefix_merge_triton
from sparsediff.kernels.merge.prefix import merge_prefix
from sparsediff.methods.losa import first_triton as losa_first_triton
from sparsediff.methods.losa import step_kernels as losa_step
from sparsediff.methods.losa import step_triton as losa_step_triton

KERNELS = {
    "_token_change_kernel": losa_step_triton, "_chunk_stats_kernel": losa_step_triton,
    "_chunk_mass_kernel": losa_step_triton, "_live_mass_kernel": losa_step_triton,
    "_rank_blocks_kernel": losa_step_triton, "_window_attention_kernel": losa_step_triton,
    "_active_first_kernel": losa_step_triton, "_merge_prefix_kernel": prefix_merge_triton,
    "_step_lengths_kernel": losa_first_triton, "_block_means_kernel": losa_first_triton,
}


def compile_only(compiled):
    """Makes each kernel's launch compile it (``warmup=True``) and record the result under its name."""
    for name, module in KERNELS.items():
        fn = getattr(module, name)

        def run(*args, _fn=fn, _name=name, grid, warmup, **kwargs):
            compiled[_name] = type(_fn).run(_fn, *args, grid=grid, warmup=True, **kwargs)

        fn.run = run


def launch_all():
    """One call of each public function that launches those kernels, on CPU tensors of LoSA-like shapes."""
    bf16, i32 = torch.bfloat16, torch.int32
    b, hq, hkv, nq, d, bs, nkb, splits = 1, 8, 2, 16, 64, 32, 8, 2
    q = torch.randn(b, hq, nq, d, dtype=bf16)
    k = torch.randn(b, hkv, nkb * bs + nq, d, dtype=bf16)
    losa_step.token_change_update(q, torch.zeros(q.shape), torch.zeros(b, nq), 0.05, backend="triton")
    rows = torch.randn(b, hkv, 64, d, dtype=bf16)
    live, bias = torch.full((b,), 40, dtype=i32), torch.zeros(nkb)
    means = torch.randn(b, hkv, nkb, d)
    losa_step.mean_key_score(rows, live, means, bias, backend="triton")
    losa_step_triton.live_mass_triton(torch.randn(b, hkv, 64, nkb), live, bias)
    losa_step.rank_blocks(torch.randn(b, hkv, nkb), 4, splits, first=True, backend="triton")
    w = bs + nq
    losa_step.window_attention(q, k, k, torch.arange(w), torch.zeros(w), 0.125, backend="triton")
    losa_step.active_first_order(q, torch.ones(b, nq, dtype=torch.bool), hkv, bs)
    parts = torch.randn(b, hq, splits, nq, d), torch.randn(b, hq, splits, nq)
    inner = torch.randn(b, hq, nq, d), torch.randn(b, hq, nq)
    merge_prefix(*parts, nq, inner, cache=(torch.zeros(b, hq, nq, d, dtype=bf16), torch.zeros(b, hq, nq)),
                 active=torch.ones(b, nq, dtype=torch.bool), out_dtype=bf16, backend="triton")
    table = torch.zeros(nkb + 1, splits, dtype=i32)
    n_dev = torch.tensor(nkb * bs)
    losa_step.step_lengths(n_dev, bs, nq, table, table, bias, torch.zeros(splits, dtype=i32),
                           torch.zeros(splits, dtype=i32), torch.zeros(splits, dtype=i32),
                           torch.zeros(w, dtype=torch.int64), torch.zeros(w), backend="triton")
    losa_step.prefix_block_means(k, n_dev, bs, 0.125, torch.zeros(b, hkv, d, nkb),
                                 torch.zeros(3, b, hkv, d, nkb, dtype=bf16),
                                 last_keys=torch.zeros(b, hkv, nkb, d, dtype=bf16), backend="triton")


def wait_comes_first(ptx):
    """The wait precedes every global memory access and return in the PTX text (the entry block comes first)."""
    wait = ptx.find("griddepcontrol.wait")
    others = [i for i in (ptx.find(op) for op in ("ld.global", "st.global", "atom.global", "ret;")) if i >= 0]
    return 0 <= wait < min(others)


def main():
    driver.set_active(Sm90Target())
    pdl.pdl_enabled = lambda x: True  # as on an H100 with SPARSEDIFF_PDL=1
    kernel_backend.interpreted = lambda: True  # CPU tensors stand in for CUDA ones: nothing runs
    compiled = {}
    compile_only(compiled)
    launch_all()
    print(json.dumps({name: {"launch_pdl": bool(kernel.metadata.launch_pdl), "target": kernel.metadata.target.arch,
                             "wait": kernel.asm["ptx"].count("griddepcontrol.wait"),
                             "launch_dependents": kernel.asm["ptx"].count("griddepcontrol.launch_dependents"),
                             "wait_first": wait_comes_first(kernel.asm["ptx"])}
                      for name, kernel in compiled.items()}))


if __name__ == "__main__":
    main()
