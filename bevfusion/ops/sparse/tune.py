"""A small autotuner that picks the dataflow (and Triton config) per layer signature.

Key: (direction, device, dtype, Cin, Cout, K, N bucket (power of two), pair-density bucket). On CUDA the
candidates are timed once on the real inputs and the winner is cached in memory, and on disk when
BEVFUSION_SPARSE_TUNE_CACHE names a JSON file. On CPU the choice is a fixed rule (no timing), so CPU
runs are deterministic.
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


def signature(direction: str, feats: torch.Tensor, weight: torch.Tensor, kmap: KernelMap) -> str:
    dev = feats.device
    devname = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    density = kmap.num_pairs / max(1, kmap.n_out * kmap.kernel_volume)
    return "|".join(str(v) for v in (direction, devname, str(feats.dtype).replace("torch.", ""), weight.shape[1],
                                      weight.shape[2], kmap.kernel_volume, _bucket(kmap.n_out),
                                      round(density * 4) / 4))


def cpu_choice(direction: str, feats: torch.Tensor, weight: torch.Tensor, kmap: KernelMap) -> str:
    """Rule for CPU: the sorted blocked im2col, which measured at least as fast as per-offset
    gather-GEMM-scatter for every SparseEncoder layer (SubM and strided, 16..128 channels); a 1x1x1
    kernel is a plain matmul, which the gather path does without copies."""
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
                _CACHE.setdefault(k, (name, cfg))


def _save_disk() -> None:
    p = _disk_path()
    if p:
        tmp = p + ".tmp"
        with open(tmp, "w") as f:
            json.dump(_CACHE, f, indent=1, sort_keys=True)
        os.replace(tmp, p)


# Implicit-GEMM candidates (BM, num_warps, num_stages, SORTED) per input dtype. Which launch spills is
# ptxas's register allocation on each triton version's code, not a smooth function of the tile: these are
# the configs that compile without spills for sm_80 and sm_90 with triton 3.6 and 3.9 for every block size
# (tests/ops/test_triton_compile.py; docs/PERFORMANCE.md). float32 (FMA, BK=16): BM=64 on 4 warps spills
# with 2 or 3 stages somewhere, so 8 warps or BM=32; fp16 / bf16 (tensor cores): as measured on the H200.
_IGEMM_FP32 = ((64, 8, 2, True), (64, 8, 3, False), (64, 4, 1, False), (32, 4, 1, True), (32, 4, 3, True),
               (32, 4, 2, False))
_IGEMM_HALF = tuple((bm, warps, stages, srt) for bm, warps, stages in ((64, 4, 2), (128, 4, 3), (128, 8, 3))
                    for srt in (False, True))


def _triton_candidates(direction: str, cin: int, cout: int, dtype=torch.float32) -> list[tuple[str, dict]]:
    """(dataflow, config) candidates for a layer (Cin, Cout) in `direction` on inputs of `dtype` (for
    dgrad: the transposed weight, Cin and Cout of the GEMM it runs)."""
    from . import triton as tk

    if direction == "wgrad":
        base = tk.default_config("wgrad", cin, cout, dtype)
        out = [("triton_wgrad", base)]
        for chunk, bp, warps in ((2048, 64, 4), (8192, 128, 8)):
            out.append(("triton_wgrad", dict(base, CHUNK=chunk, BP=bp, num_warps=warps)))
        return out
    out = []
    bn = tk.default_config("igemm", cin, cout, dtype)["BN"]
    bk = tk.block_k(cin, dtype)
    for bm, warps, stages, srt in (_IGEMM_FP32 if dtype == torch.float32 else _IGEMM_HALF):
        k = bk
        if direction == "dgrad" and (bm, warps, bn, bk) == (128, 4, 64, 32):
            k = 16  # fp16 / bf16 dgrad, transposed weight: the 128 x 32 x 64 tile on 4 warps spills on sm_80 (3.9)
        out.append(("triton_igemm", dict(BM=bm, BN=bn, BK=k, SORTED=srt, num_warps=warps, num_stages=stages)))
    for bm, stages in ((64, 2), (128, 1 if dtype == torch.float32 else 2)):  # float32 BM=128: 2 stages spill (3.6)
        out.append(("triton_gather", dict(BM=bm, BN=bn, BK=bk, num_warps=4, num_stages=stages)))
    return out


def choose(direction: str, feats: torch.Tensor, weight: torch.Tensor, kmap: KernelMap, run) -> tuple[str, dict | None]:
    """Return (dataflow, config) for this call. `run(name, config)` executes a candidate (used for timing)."""
    if feats.device.type != "cuda":
        return cpu_choice(direction, feats, weight, kmap), None
    if not _DISK_LOADED:
        _load_disk()
    sig = signature(direction, feats, weight, kmap)
    hit = _CACHE.get(sig)
    if hit is not None:
        return hit
    from . import triton as tk

    cands: list[tuple[str, dict | None]] = []
    if feats.dtype in tk.SUPPORTED_DTYPES:
        cands += _triton_candidates(direction, weight.shape[1], weight.shape[2], feats.dtype)
    cands.append(("gather", None))
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
