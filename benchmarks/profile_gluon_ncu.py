"""Where the Gluon kernel's time goes: Nsight Compute counters of the 16-bit, ``int8`` and ``int8_fp8`` kernels.

    python benchmarks/profile_gluon_ncu.py --out profile_gluon_ncu.json      # runs ncu on itself (needs ncu)
    python benchmarks/profile_gluon_ncu.py --kernels-only                    # just the launches ncu profiles

Same inputs and blocks for the three (B=1, H=16, N=16k, D=128, bf16, density ``--density``); each kernel
is launched twice and the second launch of each is profiled. Printed per kernel: duration, the pipes' share
of their peak (tensor, XU = MUFU exponentials and conversions, FMA, ALU), issue-slot use, and the warp
stall reasons per issued instruction; the JSON keeps every raw counter of the sections read.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

KERNELS = ("bf16", "int8", "int8_fp8")
SECTIONS = ("SpeedOfLight", "ComputeWorkloadAnalysis", "WarpStateStats", "SchedulerStats", "InstructionStats")


def launch(n: int, density: float, schedule: dict) -> None:
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from sparsediff.kernels import mask_to_index
    from sparsediff.kernels.block_sparse.gluon import (
        block_sparse_attention_gluon,
        block_sparse_attention_gluon_int8,
    )

    h, d = 16, 128
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(1, h, n, d, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))
    nb = n // 128
    mask = (torch.rand(1, h, nb, nb, device="cuda", generator=g) < density) | torch.eye(nb, dtype=torch.bool,
                                                                                          device="cuda")
    index, count = mask_to_index(mask)
    calls = {
        "bf16": lambda: block_sparse_attention_gluon(q, k, v, index, count, scale=d ** -0.5, return_lse=True,
                                                     **schedule),
        "int8": lambda: block_sparse_attention_gluon_int8(q, k, v, index, count, scale=d ** -0.5, return_lse=True,
                                                          **schedule),
        "int8_fp8": lambda: block_sparse_attention_gluon_int8(q, k, v, index, count, scale=d ** -0.5,
                                                              return_lse=True, pv_fp8=True, **schedule),
    }
    for _ in range(2):
        for name in KERNELS:
            calls[name]()
    torch.cuda.synchronize()


def interesting(metric: str) -> bool:
    pipe = "pipe_" in metric and "pct_of_peak_sustained_active" in metric
    stall = metric.startswith("smsp__average_warps_issue_stalled_") and metric.endswith("_per_issue_active.ratio")
    return pipe or stall or metric in (
        "gpu__time_duration.sum", "sm__inst_issued.avg.pct_of_peak_sustained_active",
        "smsp__issue_active.avg.pct_of_peak_sustained_active", "sm__throughput.avg.pct_of_peak_sustained_elapsed",
        "smsp__inst_executed.sum")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=16384)
    parser.add_argument("--density", type=float, default=1.0)
    parser.add_argument("--schedule", default="{}", help="JSON of Gluon schedule options, e.g. '{\"stages\": 4}'")
    parser.add_argument("--kernels-only", action="store_true")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    schedule = json.loads(args.schedule)
    if args.kernels_only:
        launch(args.n, args.density, schedule)
        return 0
    ncu = shutil.which("ncu")
    if ncu is None:
        print("profile_gluon_ncu.py needs Nsight Compute's ncu on PATH", file=sys.stderr)
        return 2
    cmd = [ncu, "-k", "regex:_block_sparse_fwd_gluon", "-s", str(len(KERNELS)), "-c", str(len(KERNELS)),
           *[arg for s in SECTIONS for arg in ("--section", s)], "--csv", "--page", "raw",
           sys.executable, __file__, "--kernels-only", "--n", str(args.n), "--density", str(args.density),
           "--schedule", args.schedule]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ)
    text = proc.stdout[proc.stdout.find('"ID"'):] if '"ID"' in proc.stdout else ""
    if proc.returncode != 0 or not text:
        print(proc.stdout[-3000:], proc.stderr[-3000:], file=sys.stderr)
        return 1
    rows = list(csv.reader(io.StringIO(text)))
    header, units, data = rows[0], rows[1], rows[2:]
    result = {"n": args.n, "density": args.density, "schedule": schedule, "kernels": {}}
    for name, row in zip(KERNELS, data):
        result["kernels"][name] = {m: (v, u) for m, u, v in zip(header, units, row)}
    metrics = sorted({m for k in result["kernels"].values() for m in k if interesting(m)})
    print(f"N={args.n} density={args.density} schedule={schedule}")
    print(f"{'counter':<86}" + "".join(f"{name:>14}" for name in KERNELS))
    for m in metrics:
        vals = [result["kernels"][name].get(m, ("-", ""))[0] for name in KERNELS]
        print(f"{m:<86}" + "".join(f"{v:>14}" for v in vals))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
