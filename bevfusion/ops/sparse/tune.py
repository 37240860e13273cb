"""Picking the dataflow per layer: a fixed rule for the "cpu" backend, a small autotuner on CUDA.

CPU (`cpu_choice`): a rule, no timing, so CPU runs are deterministic.

CUDA (`choose`): the candidates, kernels named "triton.igemm", "triton.gather", "triton.wgrad" (each with
a config from `triton.candidates`) and, when `with_torch`, "torch.gather" (`dataflows.py`; the only one
for float64, which the Triton kernels do not take), are timed once on the real inputs; the winner is
cached in memory, and on disk when BEVFUSION_SPARSE_TUNE_CACHE names a JSON file. Key: (candidate set,
direction, device, dtype, Cin, Cout, K, N bucket (power of two), pair-density bucket).
"""
from __future__ import annotations

import json
import os
import time

import torch

from .kmap import KernelMap

_CACHE: dict[str, tuple[str, dict | None]] = {}
_DISK_LOADED = False


def _bucket(v: int) -> int:
    return 1 << max(0, int(v) - 1).bit_length()


# Kernels a cached choice may name; a disk cache naming anything else (e.g. an older format) is ignored.
KERNELS = ("triton.igemm", "triton.gather", "triton.wgrad", "torch.gather")


def signature(direction: str, feats: torch.Tensor, weight: torch.Tensor, kmap: KernelMap,
              with_torch: bool = True) -> str:
    dev = feats.device
    devname = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    density = kmap.num_pairs / max(1, kmap.n_out * kmap.kernel_volume)
    return "|".join(str(v) for v in ("all" if with_torch else "triton", direction, devname,
                                      str(feats.dtype).replace("torch.", ""), weight.shape[1], weight.shape[2],
                                      kmap.kernel_volume, _bucket(kmap.n_out), round(density * 4) / 4))


def cpu_choice(direction: str, feats: torch.Tensor, weight: torch.Tensor, kmap: KernelMap) -> str:
    """The "cpu" backend's dataflow for dataflow="auto": the sorted blocked im2col, which measured at least
    as fast as per-offset gather-GEMM-scatter for every SparseEncoder layer (SubM and strided, 16..128
    channels); a 1x1x1 kernel is a plain matmul, which the gather path does without copies."""
    if kmap.kernel_volume == 1 or kmap.n_out == 0:
        return "gather"
    return "im2col"


def clear_cache() -> None:
    _CACHE.clear()


def _disk_path() -> str | None:
    return os.environ.get("BEVFUSION_SPARSE_TUNE_CACHE")


def _load_disk() -> None:
    global _DISK_LOADED
    _DISK_LOADED = True
    p = _disk_path()
    if p and os.path.exists(p):
        with open(p) as f:
            for k, (name, cfg) in json.load(f).items():
                if name in KERNELS:
                    _CACHE.setdefault(k, (name, cfg))


def _save_disk() -> None:
    p = _disk_path()
    if p:
        tmp = p + ".tmp"
        with open(tmp, "w") as f:
            json.dump(_CACHE, f, indent=1, sort_keys=True)
        os.replace(tmp, p)


def choose(direction: str, feats: torch.Tensor, weight: torch.Tensor, kmap: KernelMap, run,
           with_torch: bool = True) -> tuple[str, dict | None]:
    """(kernel, config) for this call on CUDA tensors; `run(kernel, config)` executes a candidate (used for
    timing). Without `with_torch` only Triton kernels compete (a dtype they do not take raises TypeError)."""
    if not _DISK_LOADED:
        _load_disk()
    sig = signature(direction, feats, weight, kmap, with_torch)
    hit = _CACHE.get(sig)
    if hit is not None:
        return hit
    from . import triton as tk

    cands: list[tuple[str, dict | None]] = []
    if feats.dtype in tk.SUPPORTED_DTYPES:
        cands += [(f"triton.{flow}", cfg) for flow, cfg in tk.candidates(direction, weight.shape[1], weight.shape[2],
                                                                          feats.dtype)]
    elif not with_torch:
        raise TypeError(f"triton sparse conv supports {tk.SUPPORTED_DTYPES}, got {feats.dtype}")
    if with_torch:
        cands.append(("torch.gather", None))
    best, best_t = cands[-1], float("inf")
    for name, cfg in cands:
        try:
            run(name, cfg)  # compile + warm
            torch.cuda.synchronize(feats.device)
            t0 = time.perf_counter()
            for _ in range(3):
                run(name, cfg)
            torch.cuda.synchronize(feats.device)
            t = time.perf_counter() - t0
        except Exception:  # a config the device cannot run (e.g. out of shared memory) is skipped
            continue
        if t < best_t:
            best, best_t = (name, cfg), t
    _CACHE[sig] = best
    _save_disk()
    return best
