"""Registers, spills and shared memory of every Triton kernel launch variant, compiled ahead of time.

No GPU needed: each variant from `bevfusion.ops.triton_aot` is compiled for sm_80 and sm_90 with the
ptxas shipped in the triton wheel, and its resource usage read from the cubin (cuobjdump) and from
ptxas -v. Prints a summary per kernel and compute capability (markdown, for docs/PERFORMANCE.md), the
variants that spill, and with --full one row per variant; --json PATH writes every row.

    python benchmarks/triton_resources.py [--cc 80 90] [--only REGEX] [--full] [--json PATH]
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
import time

# triton.jit reads TRITON_INTERPRET when the kernels are decorated: compile the real kernels.
os.environ.pop("TRITON_INTERPRET", None)
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # the launch default; silences triton 3.9's notice

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import Record, write_json  # noqa: E402


def _dtype(label: str) -> str:
    m = re.match(r"(?:points )?(fp32|fp16|bf16|fp64)", label)
    return m.group(1) if m and m.group(1) != "fp64" else "-"


def _range(values) -> str:
    lo, hi = min(values), max(values)
    return str(lo) if lo == hi else f"{lo}-{hi}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cc", type=int, nargs="+", default=[80, 90], help="compute capabilities (default 80 90)")
    ap.add_argument("--only", default=None, help="regex on variant ids (op/kernel/label)")
    ap.add_argument("--full", action="store_true", help="also print one row per variant")
    ap.add_argument("--json", default=None, help="write every row to this JSON file")
    args = ap.parse_args(argv)

    import triton

    from bevfusion.ops import triton_aot

    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="triton_resources_")  # cold: ptxas -v runs
    variants = [v for v in triton_aot.all_variants() if args.only is None or re.search(args.only, v.id)]
    results, failed = [], []
    t0 = time.perf_counter()
    for cc in args.cc:
        for i, v in enumerate(variants):
            r = triton_aot.result(v, cc)
            (results if r["ok"] else failed).append((v, r))
            if not r["ok"]:
                print(f"FAILED {v.id} sm_{cc}: {r['error'].splitlines()[-1]}", file=sys.stderr, flush=True)
            if (i + 1) % 50 == 0:
                print(f"sm_{cc}: {i + 1}/{len(variants)} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr,
                      flush=True)
    total = time.perf_counter() - t0

    cpu = sum(r["resources"]["compile_cpu_s"] for _, r in results)
    print(f"\ntriton {triton.__version__}, ptxas from the triton wheel; {len(variants)} variants x "
          f"sm_{'/'.join(map(str, args.cc))}, compiled in {total:.0f} s wall, {cpu:.0f} s CPU "
          f"({len(failed)} failed)\n")
    print("| kernel | CC | variants | registers | spilling variants (max B) | shared (B) | compile CPU s | hot |")
    print("|---|---|---|---|---|---|---|---|")
    groups: dict = {}
    for v, r in results:
        groups.setdefault((v.op, triton_aot.kernel_name(v.kernel), r["cc"]), []).append((v, r["resources"]))
    for (op, name, cc), rows in groups.items():
        res = [x for _, x in rows]
        spills = sum(1 for x in res if x["spills"])
        spill = "0" if not spills else f"{spills} ({max(x['spills'] for x in res)})"
        print(f"| {op}.{name} | {cc} | {len(rows)} | {_range([x['registers'] for x in res])} | {spill} | "
              f"{_range([x['shared'] for x in res])} | {sum(x['compile_cpu_s'] for x in res):.0f} | "
              f"{'yes' if rows[0][0].hot else 'no'} |")
    spilling = [(v, r) for v, r in results if r["resources"]["spills"]]
    if spilling:
        print("\nVariants that spill (bytes per thread: ptxas spill stores + loads, stack frame):\n")
        for v, r in spilling:
            x = r["resources"]
            print(f"- {v.id} sm_{r['cc']}: {x['registers']} registers, spill stores {x['spill_stores']}, "
                  f"spill loads {x['spill_loads']}, stack {x['stack']}, warps {x['num_warps']}")
    if args.full:
        print("\n| variant | CC | registers | spill st/ld (B) | stack (B) | shared (B) | warps | stages | CPU s |")
        print("|---|---|---|---|---|---|---|---|---|")
        for v, r in results:
            x = r["resources"]
            print(f"| {v.id} | {r['cc']} | {x['registers']} | {x['spill_stores']}/{x['spill_loads']} | {x['stack']} | "
                  f"{x['shared']} | {x['num_warps']} | {x['num_stages']} | {x['compile_cpu_s']:.1f} |")
    if args.json:
        rows = []
        for v, r in results:
            x = r["resources"]
            note = (f"regs {x['registers']}, spill st/ld {x['spill_stores']}/{x['spill_loads']} B, "
                    f"stack {x['stack']} B, shared {x['shared']} B, warps {x['num_warps']}, stages {x['num_stages']}")
            rows.append(dict(vars(Record(table=f"sm_{r['cc']}", what=v.id, dtype=_dtype(v.label), ms=None,
                                         note=note)), cc=r["cc"], hot=v.hot, **x))
        skipped = [{"what": f"{v.id} sm_{r['cc']}", "why": r["error"].splitlines()[-1]} for v, r in failed]
        write_json(args.json, "triton_resources", "CPU-only machine, ptxas from the triton wheel", rows, skipped)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
