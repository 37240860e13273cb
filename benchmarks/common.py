"""Timing helpers and the JSON output shared by the benchmarks.

Every benchmark times all contenders in one process on one device, so the ratios it prints are
meaningful even where absolute numbers drift between machines.

JSON (`--json PATH` of every script; read by tools/gpu_check.py): one object
    {"benchmark": "bev_pool|voxelize|boxes|sparse|model", "device": str, "date": "YYYY-MM-DD",
     "versions": {"torch", "triton", "numpy", "cuda"}, "rows": [Record, ...],
     "skipped": [{"what": str, "why": str}, ...]}
written atomically (tmp file + os.replace); `JsonReport` rewrites it after every table, so a benchmark
that is killed half way still leaves the rows it finished.
"""
from __future__ import annotations

import datetime
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable

import torch

from bevfusion.utils.io import atomic_write_text


def sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_fn(fn: Callable[[], object], device: torch.device | str = "cpu", warmup: int = 2,
            repeat: int = 10, min_time_s: float = 0.0) -> float:
    """Median wall time of `fn()` in milliseconds.

    On CUDA each call is bracketed by events (GPU time of the stream, host overhead included when the
    host is the bottleneck); on CPU by perf_counter. Runs at least `repeat` times and, if given, until
    `min_time_s` seconds have been spent.
    """
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    spent = 0.0
    while len(times) < repeat or spent < min_time_s:
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            ms = start.elapsed_time(end)
        else:
            t0 = time.perf_counter()
            fn()
            ms = (time.perf_counter() - t0) * 1e3
        times.append(ms)
        spent += ms / 1e3
    return statistics.median(times)


def copy_bandwidth(device: torch.device | str = "cpu", nbytes: int = 256 << 20) -> float:
    """Measured device copy bandwidth in bytes/s (bytes read + bytes written per second)."""
    a = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    b = torch.empty_like(a)
    ms = time_fn(lambda: b.copy_(a), device, warmup=2, repeat=10)
    return 2 * nbytes / (ms / 1e3)


def peak_memory_mb(device: torch.device | str) -> float | None:
    device = torch.device(device)
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**20


@dataclass
class Row:
    """One printed line: a label, its median ms, and optionally the error against the reference and the
    peak memory of one call (MiB, CUDA only)."""
    name: str
    ms: float | None
    note: str = ""
    relerr: float | None = None
    peak_mib: float | None = None

    def full_note(self) -> str:
        parts = [f"relerr {self.relerr:.1e}"] if self.relerr is not None else []
        if self.peak_mib is not None:
            parts.append(f"peak {self.peak_mib:.0f} MiB")
        if self.note:
            parts.append(self.note)
        return "; ".join(parts)


def speedup(base_ms: float | None, ms: float | None) -> float | None:
    """base_ms / ms: how many times faster a row is than its reference (None if either is missing)."""
    if base_ms is None or ms is None or ms <= 0:
        return None
    return base_ms / ms


def print_table(title: str, rows: list[Row], baseline: str | None = None) -> None:
    """Print rows with their time and, if `baseline` names a row, the speed-up against it."""
    base = next((r.ms for r in rows if r.name == baseline), None)
    print(f"\n## {title}")
    header = f"| {'what':<48} | {'ms':>10} |" + (f" {'x vs ' + baseline:>18} |" if base else "") + " note |"
    print(header)
    print("|" + "-" * (len(header) - 2) + "|")
    for r in rows:
        x = speedup(base, r.ms)
        ratio = (f" {x:>18.2f} |" if x is not None else f" {'-':>18} |") if base else ""
        ms = f"{r.ms:>10.3f}" if r.ms is not None else f"{'-':>10}"
        print(f"| {r.name:<48} | {ms} |{ratio} {r.full_note()} |", flush=True)


def device_name(device: torch.device | str) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def cuda_peak_mib(fn: Callable[[], object], device: torch.device | str) -> tuple[object, float | None]:
    """Run `fn()` once; return its result and, on CUDA, the peak memory it allocated on top of what was
    allocated before (MiB; its output included). None on CPU."""
    device = torch.device(device)
    if device.type != "cuda":
        return fn(), None
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    out = fn()
    torch.cuda.synchronize(device)
    return out, (torch.cuda.max_memory_allocated(device) - base) / 2**20


# Datasheet memory bandwidth (bytes/s), by a substring of torch.cuda.get_device_name; first match wins.
# Used only to state the memory floor against the vendor's number next to the measured copy bandwidth.
_DATASHEET_BW = (("GH200", None), ("H200", 4.8e12), ("H100 NVL", 3.9e12), ("H100 PCIe", 2.0e12),
                 ("H100", 3.35e12), ("A100-SXM4-80GB", 2.039e12), ("A100 80GB PCIe", 1.935e12),
                 ("A100", 1.555e12), ("L40S", 0.864e12), ("B200", 8.0e12))


def datasheet_bandwidth(name: str) -> float | None:
    """Vendor memory bandwidth of a GPU named like torch.cuda.get_device_name (bytes/s), or None."""
    for key, bw in _DATASHEET_BW:
        if key in name:
            return bw
    return None


# ----------------------------------------------------------------------------- JSON output
DTYPE_NAMES = ("fp32", "fp16", "bf16", "int", "-")


@dataclass
class Record:
    """One row of a benchmark's JSON. `ratio` is the speed-up against the row named by `ratio_vs`
    (its ms / this row's ms: > 1 means this row is faster); with ratio_vs "floor" it is the fraction
    of the memory-floor speed reached (0.5 = twice the floor's time)."""
    table: str
    what: str
    dtype: str = "-"
    ms: float | None = None
    ratio: float | None = None
    ratio_vs: str | None = None
    peak_mib: float | None = None
    relerr: float | None = None
    note: str = ""

    def __post_init__(self):
        if self.dtype not in DTYPE_NAMES:
            raise ValueError(f"Record {self.what!r}: dtype must be one of {DTYPE_NAMES}, got {self.dtype!r}")
        for name in ("ms", "ratio", "peak_mib", "relerr"):
            v = getattr(self, name)
            if v is not None:
                v = float(v)
                setattr(self, name, v if v == v and abs(v) != float("inf") else None)  # JSON has no NaN


def versions() -> dict:
    """Versions of the stack a number was measured on ("cuda": torch's CUDA runtime, None on a CPU build)."""
    try:
        import triton

        tv = triton.__version__
    except Exception:  # noqa: BLE001 - triton absent or broken: report it as missing
        tv = None
    import numpy

    return {"torch": torch.__version__, "triton": tv, "numpy": numpy.__version__, "cuda": torch.version.cuda}


def _as_dict(r) -> dict:
    return asdict(r) if isinstance(r, Record) else dict(r)


def _as_skip(s) -> dict:
    if isinstance(s, dict):
        return {"what": str(s["what"]), "why": str(s["why"])}
    what, why = s
    return {"what": str(what), "why": str(why)}


def write_json(path: str | os.PathLike, benchmark: str, device: str, rows: Iterable, skipped: Iterable = ()) -> None:
    """Write the benchmark JSON object to `path` atomically (tmp file in the same folder + os.replace).

    rows: Record or dicts with the Record fields; skipped: {"what", "why"} dicts or (what, why) pairs.
    """
    path = os.fspath(path)
    obj = {"benchmark": benchmark, "device": device, "date": datetime.date.today().isoformat(),
           "versions": versions(), "rows": [_as_dict(r) for r in rows], "skipped": [_as_skip(s) for s in skipped]}
    atomic_write_text(path, json.dumps(obj, indent=1, allow_nan=False))


@dataclass
class JsonReport:
    """Collects a benchmark's rows and skipped lines; with a path, rewrites the JSON after every change."""
    path: str | None
    benchmark: str
    device: str
    rows: list = field(default_factory=list)
    skipped: list = field(default_factory=list)

    def flush(self) -> None:
        if self.path:
            write_json(self.path, self.benchmark, self.device, self.rows, self.skipped)

    def add(self, *records: Record) -> None:
        self.rows.extend(records)
        self.flush()

    def skip(self, what: str, why: str) -> None:
        """Record (and print) a row or table that was not measured, with a one-line reason."""
        why = " ".join(str(why).split())
        print(f"skipped: {what}: {why}", flush=True)
        self.skipped.append({"what": what, "why": why})
        self.flush()

    def table(self, title: str, rows: list[Row], dtype: str, baseline: str | None = None,
              ratio_vs: dict[str, tuple[str, float | None]] | None = None) -> None:
        """Print a table and record its rows; each row's ratio is its speed-up against `baseline`, or
        against ratio_vs[row name] = (label, ms) where given."""
        print_table(title, rows, baseline)
        base = next((r.ms for r in rows if r.name == baseline), None)
        out = []
        for r in rows:
            vs_label, vs_ms = (ratio_vs or {}).get(r.name, (baseline if base is not None else None, base))
            x = speedup(vs_ms, r.ms) if vs_label is not None and r.name != vs_label else None
            out.append(Record(table=title, what=r.name, dtype=dtype, ms=r.ms, ratio=x,
                              ratio_vs=vs_label if x is not None else None, peak_mib=r.peak_mib,
                              relerr=r.relerr, note=r.note))
        self.add(*out)


def one_line(exc: BaseException | str) -> str:
    """A short one-line reason from an exception or a message."""
    if isinstance(exc, BaseException):
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        text = f"{type(exc).__name__}: {lines[-1]}" if lines else type(exc).__name__
    else:
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        text = lines[-1] if lines else ""
    return text if len(text) <= 200 else text[:197] + "..."


def probe_import(module: str, timeout: float = 120.0) -> tuple[str | None, str | None]:
    """Try `import module` in a child process (an optional peer may be absent, fail to load its native
    libraries, or crash the interpreter). Returns (version, None) if it imports, else (None, reason)."""
    top = module.split(".")[0]
    code = (f"import {module}, sys; m = sys.modules[{top!r}]; "
            "print('VERSION', getattr(m, '__version__', 'unknown'))")
    try:
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None, f"import {module} timed out after {timeout:.0f} s"
    if r.returncode == 0:
        ver = [ln.split(None, 1)[1] for ln in r.stdout.splitlines() if ln.startswith("VERSION ")]
        return (ver[-1].strip() if ver else "unknown"), None
    if r.returncode < 0:
        return None, f"import {module} crashed the interpreter (signal {-r.returncode})"
    return None, f"import {module} failed: {one_line(r.stderr) or f'exit code {r.returncode}'}"
