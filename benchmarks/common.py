"""Timing helpers shared by the benchmarks.

Every benchmark times all contenders in one process on one device, so the ratios it prints are
meaningful even where absolute numbers drift between machines.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch


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
    name: str
    ms: float
    note: str = ""


def print_table(title: str, rows: list[Row], baseline: str | None = None) -> None:
    """Print rows with their time and, if `baseline` names a row, the speed-up against it."""
    base = next((r.ms for r in rows if r.name == baseline), None)
    print(f"\n## {title}")
    header = f"| {'what':<48} | {'ms':>10} |" + (f" {'x vs ' + baseline:>18} |" if base else "") + " note |"
    print(header)
    print("|" + "-" * (len(header) - 2) + "|")
    for r in rows:
        ratio = f" {base / r.ms:>18.2f} |" if base else ""
        print(f"| {r.name:<48} | {r.ms:>10.3f} |{ratio} {r.note} |")


def device_name(device: torch.device | str) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
