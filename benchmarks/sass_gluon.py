"""What the Gluon kernel compiles to: SASS opcode counts and the order of wgmma, waits and exponentials.

    python benchmarks/sass_gluon.py                       # CPU: compiles for sm_90a, needs no GPU
    python benchmarks/sass_gluon.py --schedule '{"tree_reduce": true}' --out sass.json
    python benchmarks/sass_gluon.py --kernels int8,int8_fp8 --schedule '{"pair_tiles": true}'

For the 16-bit, ``int8`` and ``int8_fp8`` kernels (D=128, no masking): the count of each SASS opcode in the
whole kernel (two consumer warpgroups, each a first tile, the loop and the tail), the longest chain of
dependent max ops (the row max's latency), and the loop's sequence of wgmma issues (HGMMA / IGMMA / QGMMA),
wgmma waits (``WARPGROUP.DEPBAR``), named barriers and exponentials (``MUFU.EX2``), run-length coded. The
in-warpgroup overlap needs the wait for P·V(j-1) to come after the exponentials of tile j; where ptxas hoisted
it above them, the softmax does not overlap P·V.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KERNELS = {  # gluon_aot.py's variant tuples: head dim, dtype, even N, LSE, causal, live rows, INT8 Q·Kᵀ, FP8 P·V
    "bf16": (128, "bfloat16", True, True, False, False, False, False),
    "int8": (128, "bfloat16", True, True, False, False, True, False),
    "int8_fp8": (128, "bfloat16", True, True, False, False, True, True),
}
ORDER = re.compile(r"^(HGMMA|IGMMA|QGMMA|WARPGROUP\.DEPBAR|BAR\.SYNC|MUFU\.EX2)")


def opcodes(sass: str) -> list[str]:
    ops = []
    for line in sass.splitlines():
        m = re.match(r"\s+/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_.]+)", line)
        if m:
            ops.append(m.group(1))
    return ops


def max_chain(sass: str) -> int:
    """The longest chain of dependent max ops (FMNMX / VIMNMX): the row max's latency on the softmax's path."""
    depth, best = {}, 0
    for line in sass.splitlines():
        m = re.search(r"\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_.]+)\s+([^;]*);", line)
        regs = re.findall(r"\bR\d+\b", m.group(2)) if m else []
        if not regs:
            continue
        if m.group(1).startswith(("FMNMX", "VIMNMX")):
            depth[regs[0]] = 1 + max([depth.get(r, 0) for r in regs[1:]] + [0])
            best = max(best, depth[regs[0]])
        else:
            depth[regs[0]] = 0
    return best


def run_length(ops: list[str]) -> list[str]:
    out = []
    for op in ops:
        name = op.split(".")[0] if not op.startswith(("WARPGROUP.DEPBAR", "BAR.SYNC", "MUFU.EX2")) else \
            ".".join(op.split(".")[:2])
        if out and out[-1][0] == name:
            out[-1][1] += 1
        else:
            out.append([name, 1])
    return [f"{n}x{c}" if c > 1 else n for n, c in out]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--schedule", default="{}", help="JSON of Gluon schedule options")
    parser.add_argument("--kernels", default=",".join(KERNELS), help="comma-separated, of " + ", ".join(KERNELS))
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    kernels = {name: KERNELS[name] for name in args.kernels.split(",")}
    os.environ.pop("TRITON_INTERPRET", None)
    sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
    import gluon_aot
    from triton.runtime import driver

    driver.set_active(gluon_aot.Sm90Target())
    cuobjdump = Path(sys.modules["triton.backends.nvidia"].__file__).parent / "bin" / "cuobjdump"
    schedule = json.loads(args.schedule)
    result = {"schedule": schedule, "kernels": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name, variant in kernels.items():
            kernel = gluon_aot.compile_variant(*variant, **schedule)
            cubin = Path(tmp) / f"{name}.cubin"
            cubin.write_bytes(kernel.asm["cubin"])
            sass = subprocess.run([str(cuobjdump), "-sass", str(cubin)], capture_output=True, text=True,
                                  check=True).stdout
            ops = opcodes(sass)
            counts = collections.Counter(op.split(".")[0] for op in ops)
            result["kernels"][name] = {"counts": dict(counts.most_common()), "max_chain": max_chain(sass),
                                       "order": run_length([op for op in ops if ORDER.match(op)])}
    names = list(kernels)
    top = sorted({op for k in result["kernels"].values() for op in list(k["counts"])[:24]},
                 key=lambda op: -max(result["kernels"][n]["counts"].get(op, 0) for n in names))
    print(f"schedule {schedule}\n{'opcode':<12}" + "".join(f"{n:>12}" for n in names))
    for op in top:
        print(f"{op:<12}" + "".join(f"{result['kernels'][n]['counts'].get(op, 0):>12}" for n in names))
    print(f"{'max chain':<12}" + "".join(f"{result['kernels'][n]['max_chain']:>12}" for n in names))
    for n in names:
        print(f"\n{n}: " + " ".join(result["kernels"][n]["order"]))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
