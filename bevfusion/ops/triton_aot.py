"""Ahead-of-time compilation of every Triton kernel launch that `bevfusion.ops` can make (tests and
benchmarks only; nothing imports this module at package import).

Each `bevfusion/ops/<op>/triton.py` exposes `aot_variants()`: the launches its launchers can produce on
a GPU (kernel, argument types, constexprs, num_warps, num_stages), built from the same tables the
launchers read. This module collects them, compiles one for a target compute capability with
`triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))` (no GPU needed: ptxas and cuobjdump
ship in the triton wheel) and reads the resource usage from the cubin.

Argument specs follow what the JIT specialises at run time: pointers are 16-byte aligned (torch
allocations are); an int argument given as a value is specialised like the JIT does (1 becomes the
constant 1, a multiple of 16 gets the divisibility-16 hint, i32 or i64 by range); an int given as a
type string ("i32") is a plain integer of that type.

CLI (run without TRITON_INTERPRET: `triton.jit` makes interpreter objects when it is set):
    python -m bevfusion.ops.triton_aot serve                  compile server for tests/ops/test_triton_compile.py
    python -m bevfusion.ops.triton_aot check [--cc 90 ...]    compile everything with the test's checks (exit 1
                                                              on a failure; used with the oldest supported triton)
"""
from __future__ import annotations

import contextlib
import importlib
import inspect
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TARGETS = (80, 90)
# Largest shared memory one block may use on sm_80 (A100, the smallest of our targets): 163 KiB.
SM80_MAX_SHARED = 166912

I32, I64, I8 = "*i32", "*i64", "*i8"
_PTR = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "float64": "fp64", "int64": "i64",
        "int32": "i32", "int8": "i8"}
_OPTIONS = ("num_warps", "num_stages")


def ptr(dtype) -> str:
    """Pointer type of a torch dtype: torch.float16 -> "*fp16"."""
    name = str(dtype).replace("torch.", "")
    if name not in _PTR:
        raise ValueError(f"triton_aot: no pointer type for {dtype}")
    return "*" + _PTR[name]


def kernel_name(kernel) -> str:
    return kernel.fn.__name__


@dataclass(frozen=True)
class Variant:
    """One launch variant of one kernel. args: (name, spec) for the runtime arguments in order (spec: a
    type string, or an int example value that is specialised like the JIT does); constexprs: (name,
    value); num_warps / num_stages: None = Triton's default (what a launcher that does not pass it gets)."""
    op: str
    kernel: Any
    label: str
    args: tuple
    constexprs: tuple
    num_warps: int | None
    num_stages: int | None
    hot: bool
    require_ptx: tuple = ()
    forbid_ptx: tuple = ()

    @property
    def id(self) -> str:
        return f"{self.op}/{kernel_name(self.kernel)}/{self.label}"

    def specialise(self):
        """(signature, constexprs, attrs) for ASTSource, with the JIT's integer and pointer rules."""
        names = self.kernel.arg_names
        consts = dict(self.constexprs)
        args = dict(self.args)
        sig, attrs = {}, {}
        for i, name in enumerate(names):
            if name in consts:
                sig[name] = "constexpr"
                continue
            spec = args[name]
            if isinstance(spec, bool) or not isinstance(spec, (int, str)):
                raise TypeError(f"triton_aot: {self.id}: argument {name} spec must be a type string or an int, "
                                f"got {spec!r}")
            if isinstance(spec, int):
                if spec == 1:  # the JIT turns an int argument equal to 1 into the constant 1
                    sig[name] = "constexpr"
                    consts[name] = 1
                    continue
                sig[name] = "i32" if -2**31 <= spec < 2**31 else "i64"
                if spec % 16 == 0:
                    attrs[(i,)] = [["tt.divisibility", 16]]
            else:
                sig[name] = spec
                if spec.startswith("*"):
                    attrs[(i,)] = [["tt.divisibility", 16]]
        return sig, consts, attrs

    def compile_key(self):
        sig, consts, attrs = self.specialise()
        return (self.op, kernel_name(self.kernel), tuple(sig.items()), tuple(sorted(consts.items(), key=str)),
                tuple(sorted(attrs)), self.num_warps, self.num_stages)

    def with_ints_one(self) -> "Variant":
        """The same launch with every integer argument equal to 1 (one point, a 1x1x1 kernel, unit
        strides): the JIT compiles those as constants, which catches code that only works on tensors."""
        args = tuple((n, 1 if isinstance(s, int) or not s.startswith("*") else s) for n, s in self.args)
        return Variant(self.op, self.kernel, self.label + " ints=1", args, self.constexprs, self.num_warps,
                       self.num_stages, hot=False)


def launch(op: str, kernel, label: str, *, hot: bool, args: dict, meta: dict, require_ptx=(),
           forbid_ptx=()) -> Variant:
    """A Variant from a launcher's runtime arguments (name -> spec) and its keyword arguments `meta`
    (constexprs plus num_warps / num_stages), checked against the kernel's parameter list."""
    consts = {k: v for k, v in meta.items() if k not in _OPTIONS}
    names = list(kernel.arg_names)
    missing = [n for n in names if n not in args and n not in consts]
    extra = [n for n in list(args) + list(consts) if n not in names]
    both = [n for n in args if n in consts]
    if missing or extra or both:
        raise ValueError(f"triton_aot: {op}/{kernel_name(kernel)} [{label}]: arguments do not match the kernel's "
                         f"parameters {names}: missing {missing}, unknown {extra}, given twice {both}")
    return Variant(op, kernel, label, tuple((n, args[n]) for n in names if n in args),
                   tuple((n, consts[n]) for n in names if n in consts), meta.get("num_warps"),
                   meta.get("num_stages"), hot, tuple(require_ptx), tuple(forbid_ptx))


# ----------------------------------------------------------------------------- collecting
def triton_modules() -> list[str]:
    """Every `bevfusion/ops/<op>/triton.py`, found on disk so that a new op cannot be missed."""
    root = Path(__file__).resolve().parent
    return [f"bevfusion.ops.{p.parent.name}.triton" for p in sorted(root.glob("*/triton.py"))]


def all_variants() -> list[Variant]:
    """The launch variants of all ops, identical compiles merged (first label kept), ids unique."""
    out, keys, ids = [], set(), set()
    for modname in triton_modules():
        mod = importlib.import_module(modname)
        if not callable(getattr(mod, "aot_variants", None)):
            raise AttributeError(f"triton_aot: {modname} has no aot_variants()")
        for v in mod.aot_variants():
            key = v.compile_key()
            if key in keys:
                continue
            if v.id in ids:
                raise ValueError(f"triton_aot: {modname}: duplicate variant id {v.id!r} for different launches")
            keys.add(key)
            ids.add(v.id)
            out.append(v)
    return out


def edge_variants(variants: list[Variant] | None = None) -> list[Variant]:
    """Per kernel, its first variant with every integer argument equal to 1."""
    seen, out = set(), []
    for v in variants if variants is not None else all_variants():
        if (v.op, kernel_name(v.kernel)) not in seen:
            seen.add((v.op, kernel_name(v.kernel)))
            out.append(v.with_ints_one())
    return out


def defined_kernels(modname: str) -> dict:
    """name -> kernel for every @triton.jit function defined in a module (JIT or interpreter objects)."""
    from triton.runtime.jit import KernelInterface

    mod = importlib.import_module(modname)
    return {n: k for n, k in vars(mod).items()
            if isinstance(k, KernelInterface) and getattr(getattr(k, "fn", None), "__module__", None) == modname}


def coverage_problems(variants: list[Variant] | None = None) -> list[str]:
    """Kernels that no variant launches and that no launched kernel calls (directly or through helpers)."""
    variants = variants if variants is not None else all_variants()
    problems = []
    for modname in triton_modules():
        kernels = defined_kernels(modname)
        launched = {kernel_name(v.kernel) for v in variants if v.kernel.fn.__module__ == modname}
        reached, todo = set(launched), list(launched)
        while todo:
            src = inspect.getsource(kernels[todo.pop()].fn)
            for name in kernels:
                if name not in reached and re.search(rf"(?<![\w.]){re.escape(name)}\s*\(", src):
                    reached.add(name)
                    todo.append(name)
        problems += [f"{modname}.{n}: defined with @triton.jit but neither launched by aot_variants() nor called "
                     f"from a launched kernel" for n in sorted(set(kernels) - reached)]
    return problems


# ----------------------------------------------------------------------------- compiling
@dataclass
class Resources:
    """Per-thread registers and local memory, per-block shared memory (bytes) of one compiled kernel.
    spill_* come from ptxas -v (None when the log was not available); stack/local from cuobjdump."""
    registers: int
    stack: int
    local: int
    spill_stores: int | None
    spill_loads: int | None
    shared_static: int
    shared_dynamic: int
    num_warps: int
    num_stages: int
    compile_s: float
    compile_cpu_s: float  # this process and its children (ptxas): what a busy machine does not inflate

    @property
    def shared(self) -> int:
        return self.shared_static + self.shared_dynamic

    @property
    def spills(self) -> int:
        """Bytes spilled or kept on the stack per thread (0 = everything in registers)."""
        return (self.spill_stores or 0) + (self.spill_loads or 0) + self.stack + self.local


def _tool(name: str) -> str | None:
    """A CUDA binary shipped in the triton wheel (backends/nvidia/bin), else on PATH."""
    import triton

    p = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    return str(p) if p.exists() else shutil.which(name)


def compile_variant(v: Variant, cc: int):
    """Compile for sm_<cc>; returns (CompiledKernel, ptxas -v log or "")."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    if not isinstance(v.kernel, JITFunction):
        raise RuntimeError(f"triton_aot: {v.id} is not a JITFunction ({type(v.kernel).__name__}): unset "
                           "TRITON_INTERPRET before importing the kernels")
    sig, consts, attrs = v.specialise()
    options = {k: getattr(v, k) for k in _OPTIONS if getattr(v, k) is not None}
    log, before = io.StringIO(), os.environ.get("TRITON_DUMP_PTXAS_LOG")
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"  # triton prints ptxas -v's report to stdout
    try:
        with contextlib.redirect_stdout(log):
            k = triton.compile(ASTSource(fn=v.kernel, signature=sig, constexprs=consts, attrs=attrs),
                               target=GPUTarget("cuda", cc, 32), options=options)
    finally:
        if before is None:
            del os.environ["TRITON_DUMP_PTXAS_LOG"]
        else:
            os.environ["TRITON_DUMP_PTXAS_LOG"] = before
    return k, log.getvalue()


def _resource_usage(cubin: bytes) -> dict:
    tool = _tool("cuobjdump")
    if tool is None:
        raise RuntimeError("triton_aot: cuobjdump not found (neither in the triton wheel nor on PATH)")
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        res = subprocess.run([tool, "--dump-resource-usage", path], capture_output=True, text=True)
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", res.stdout)
    if res.returncode or m is None:
        raise RuntimeError(f"triton_aot: cuobjdump --dump-resource-usage failed: {res.stdout[-500:]} "
                           f"{res.stderr[-500:]}")
    return dict(zip(("registers", "stack", "shared_static", "local"), map(int, m.groups())))


def _cpu_s() -> float:
    import resource

    ch = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + ch.ru_utime + ch.ru_stime


def measure(v: Variant, cc: int) -> tuple[Resources, list[str]]:
    """Compile one variant; returns its resources and the failed PTX checks (empty if none)."""
    t0, c0 = time.perf_counter(), _cpu_s()
    k, log = compile_variant(v, cc)
    dt, cpu = time.perf_counter() - t0, _cpu_s() - c0
    use = _resource_usage(k.asm["cubin"])
    m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    md = k.metadata
    res = Resources(registers=use["registers"], stack=use["stack"], local=use["local"],
                    spill_stores=int(m.group(1)) if m else None, spill_loads=int(m.group(2)) if m else None,
                    shared_static=use["shared_static"], shared_dynamic=int(md.shared), num_warps=int(md.num_warps),
                    num_stages=int(md.num_stages), compile_s=dt, compile_cpu_s=cpu)
    ptx = k.asm["ptx"]
    bad = [f"PTX lacks {s!r}" for s in v.require_ptx if s not in ptx]
    bad += [f"PTX contains {s!r}" for s in v.forbid_ptx if s in ptx]
    return res, bad


def result(v: Variant, cc: int) -> dict:
    """measure() as a JSON-able dict: {"id", "cc", "ok", "error", "resources", "ptx_problems"}."""
    try:
        res, bad = measure(v, cc)
    except Exception as e:  # noqa: BLE001 - reported to the caller with the variant named
        lines = [ln for ln in str(e).splitlines() if ln.strip()]
        return {"id": v.id, "cc": cc, "ok": False, "error": f"{type(e).__name__}: " + "\n".join(lines[-40:]),
                "resources": None, "ptx_problems": []}
    return {"id": v.id, "cc": cc, "ok": True, "error": None, "resources": dict(vars(res), shared=res.shared,
                                                                                 spills=res.spills),
            "ptx_problems": bad}


def problems(v: Variant, r: dict) -> list[str]:
    """What the compile test requires of a result: it compiles, its PTX checks hold, a hot kernel does
    not spill, shared memory fits sm_80."""
    if not r["ok"]:
        return [r["error"]]
    x, out = r["resources"], list(r["ptx_problems"])
    if v.hot and x["spills"]:
        out.append(f"hot kernel spills: {x['registers']} registers, spill stores {x['spill_stores']} B, spill loads "
                   f"{x['spill_loads']} B, stack {x['stack']} B, local {x['local']} B (num_warps {x['num_warps']})")
    if x["shared"] > SM80_MAX_SHARED:
        out.append(f"{x['shared']} B shared memory per block (static {x['shared_static']}, dynamic "
                   f"{x['shared_dynamic']}) exceeds sm_80's {SM80_MAX_SHARED} B")
    return out


# ----------------------------------------------------------------------------- CLI
def _serve() -> int:
    """Read "variant id<TAB>cc" lines on stdin, answer one JSON line each on stdout."""
    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # anything else printed (C or Python) goes to stderr, not into the answers
    sys.stdout = sys.stderr
    variants = all_variants()
    by_id = {v.id: v for v in variants + edge_variants(variants)}
    for line in sys.stdin:
        vid, _, cc = line.rstrip("\n").rpartition("\t")
        v = by_id.get(vid)
        ans = result(v, int(cc)) if v is not None else {"id": vid, "cc": cc, "ok": False, "resources": None,
                                                        "error": "unknown variant id", "ptx_problems": []}
        out.write(json.dumps(ans) + "\n")
        out.flush()
    return 0


def _check(ccs, only: str | None) -> int:
    import triton

    variants = [v for v in all_variants() if only is None or re.search(only, v.id)]
    todo = [(v, cc) for cc in ccs for v in variants] + [(v, max(ccs)) for v in edge_variants(variants)]
    t0, failed = time.perf_counter(), []
    for v, cc in todo:
        r = result(v, cc)
        bad = problems(v, r)
        if bad:
            failed.append(r)
            print(f"FAIL {v.id} sm_{cc}: {'; '.join(b.splitlines()[-1] for b in bad)}", flush=True)
    print(f"triton {triton.__version__}: {len(todo) - len(failed)} of {len(todo)} variants compiled and passed the "
          f"checks (sm_{'/'.join(map(str, ccs))}) in {time.perf_counter() - t0:.0f} s", flush=True)
    return 1 if failed else 0


def main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m bevfusion.ops.triton_aot", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("serve", help="compile server (one JSON line per 'id<TAB>cc' line on stdin)")
    c = sub.add_parser("check", help="compile every variant, exit 1 on any failure")
    c.add_argument("--cc", type=int, nargs="+", default=list(TARGETS))
    c.add_argument("--only", default=None, help="regex on variant ids (op/kernel/label)")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        ap.error("TRITON_INTERPRET is set: triton.jit would make interpreter objects; unset it")
    with tempfile.TemporaryDirectory(prefix="triton_aot_cache_") as cache:
        os.environ["TRITON_CACHE_DIR"] = cache  # a cold cache: every variant really compiles (and logs ptxas -v)
        return _serve() if args.cmd == "serve" else _check(args.cc, args.only)


if __name__ == "__main__":
    sys.exit(main())
