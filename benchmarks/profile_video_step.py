"""Where a sparse Wan2.1-1.3B step spends its time: host syncs, launch-bound gaps, and the top GPU kernels.

    python benchmarks/profile_video_step.py --method ba_att --sparsity 0.5 --layout rowmajor tiled \
        --out profile_video.json                                    # GPU: 81x480x832 -> 32,760 tokens
    python benchmarks/profile_video_step.py --quick --out /tmp/p.json   # CPU smoke run, tiny model

For each (method, layout): ``syncs`` lists the places that synchronised the host with the GPU during one step
(``torch.cuda.set_sync_debug_mode``; each one lets the GPU run dry while the host catches up), ``enqueue_s``
is how long the host takes to issue a step (a step is launch-bound where it nears ``step_s``), ``kernel_s`` the
summed GPU time of the step's kernels (from the profiler) and ``top`` the kernels that take most of it.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import sys
import time
import traceback
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_video import build, sdpa_backends, sync, what_ran  # noqa: E402

import sparsediff  # noqa: E402


def _where(stack) -> str:
    """The innermost frame of the library (else of the caller) in a stack."""
    frames = [f for f in stack if "sparsediff" in f.filename and "profile_video_step" not in f.filename]
    frame = frames[-1] if frames else stack[-2]
    return f"{os.path.relpath(frame.filename)}:{frame.lineno} ({frame.name})"


def find_syncs(model, inputs) -> dict:
    """Host-device synchronisations in one step, by where the library issued them."""
    found = collections.Counter()
    shown = warnings.showwarning

    def record(message, category, filename, lineno, file=None, line=None):
        if "synchronizing" in str(message):
            found[_where(traceback.extract_stack()[:-1])] += 1
        else:
            shown(message, category, filename, lineno, file, line)

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with torch.inference_mode(), sdpa_backends(True):
                model(**inputs, return_dict=False)
        finally:
            torch.cuda.set_sync_debug_mode("default")
            sync(True)
    return dict(found.most_common())


def enqueue_seconds(model, inputs, cuda, repeat) -> tuple[float, float]:
    """(host time to issue a step, wall time of the step), medians."""
    issue, wall = [], []
    with torch.inference_mode(), sdpa_backends(cuda):
        for _ in range(repeat):
            sync(cuda)
            start = time.perf_counter()
            model(**inputs, return_dict=False)
            issue.append(time.perf_counter() - start)
            sync(cuda)
            wall.append(time.perf_counter() - start)
    return statistics.median(issue), statistics.median(wall)


def kernel_profile(model, inputs, cuda, top) -> tuple[float, list]:
    """(summed device time of one step's kernels, the ``top`` kernels by device time)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with torch.inference_mode(), sdpa_backends(cuda), profile(activities=activities) as prof:
        model(**inputs, return_dict=False)
        sync(cuda)
    attr = "device_time_total" if cuda else "cpu_time_total"
    events = [e for e in prof.key_averages() if (not cuda or getattr(e, "device_type", None) is not None)]
    kernels = [e for e in events if getattr(e, attr, 0) > 0]
    if cuda:  # kernels only: the profiler also lists the ops that launched them
        kernels = [e for e in kernels if getattr(e, "self_device_time_total", 0) > 0]
        attr = "self_device_time_total"
    kernels.sort(key=lambda e: getattr(e, attr), reverse=True)
    total = sum(getattr(e, attr) for e in kernels) / 1e6
    rows = [{"name": e.key[:90], "ms": getattr(e, attr) / 1e3, "calls": e.count} for e in kernels[:top]]
    return total, rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model on CPU (smoke run)")
    parser.add_argument("--method", nargs="+", default=["ba_att"])
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--layout", nargs="+", default=["rowmajor", "tiled"])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument("--out", default="profile_video.json")
    args = parser.parse_args(argv)

    cuda = torch.cuda.is_available() and not args.quick
    device = torch.device("cuda" if cuda else "cpu")
    model, inputs, tokens = build(args.quick, device, torch.bfloat16 if cuda else torch.float32)
    extra = dict(block_size=16, min_seq_len=0) if args.quick else {}
    runs = []
    for method in ["dense", *args.method]:
        for layout in (["-"] if method == "dense" else args.layout):
            if method != "dense":
                sparsediff.enable(model, method, sparsity=args.sparsity, layout=layout, **extra)
            enqueue_seconds(model, inputs, cuda, 2)  # compile and autotune
            issue, wall = enqueue_seconds(model, inputs, cuda, args.repeat)
            kernel_s, top = kernel_profile(model, inputs, cuda, args.top)
            syncs = find_syncs(model, inputs) if cuda else {}
            ran = what_ran(model) if method != "dense" else {}  # routes: what ran sparse, what fell back and why
            sparsediff.disable(model)
            runs.append({"method": method, "layout": layout, "sparsity": 0.0 if method == "dense" else args.sparsity,
                         "step_s": wall, "enqueue_s": issue, "kernel_s": kernel_s, "syncs": syncs, "top": top,
                         **ran})
            print(f"{method} {layout}: step {wall * 1e3:.1f} ms, host issues it in {issue * 1e3:.1f} ms, kernels "
                  f"{kernel_s * 1e3:.1f} ms, {sum(syncs.values())} syncs", flush=True)
    with open(args.out, "w") as f:
        json.dump({"benchmark": "profile_video_step", "tokens": tokens, "quick": args.quick,
                   "device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
                   "runs": runs}, f, indent=2)
    print(f"\nJSON: {args.out}")
    for run in runs:
        print(f"\n{run['method']} {run['layout']}: step {run['step_s'] * 1e3:.1f} ms, issue "
              f"{run['enqueue_s'] * 1e3:.1f} ms, kernels {run['kernel_s'] * 1e3:.1f} ms")
        if "routes" in run:
            print(f"  attention calls by route: {run['routes']} (sparse share {run['sparse_share']:.0%})")
        for where, n in run["syncs"].items():
            print(f"  sync x{n}: {where}")
        for row in run["top"]:
            print(f"  {row['ms']:9.2f} ms {row['calls']:5d}x  {row['name']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
