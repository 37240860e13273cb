#!/usr/bin/env python3
"""Where the time of one SparseEncoder forward goes: host syncs, GPU-busy time, top ops.

Uses the scene and the network of `bench_sparse.py` (BEVFusion's nuScenes 0.075 encoder, ~112k voxels).
Prints the wall time, the number of host syncs of one forward (torch's sync debug mode), the GPU-busy
time (sum of kernel, memcpy and memset durations from the profiler) with the kernel count, and the top
ops by device time and by host time.

    python benchmarks/profile_sparse.py [--device cuda] [--dtype fp16] [--small] [--top 20]
"""
from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch

from bench_sparse import SPARSE_SHAPE, build_ours, load_scene
from bevfusion.ops.sparse import SparseTensor


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="fp16", choices=["fp32", "fp16", "bf16"])
    ap.add_argument("--small", action="store_true", help="a tiny scene (for checking the script on a CPU)")
    ap.add_argument("--top", type=int, default=20)
    ap.add_argument("--runs", type=int, default=10)
    args = ap.parse_args(argv)
    dev = torch.device(args.device)
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    coords, feats = load_scene(small=args.small)
    coords = torch.from_numpy(coords).to(dev)
    feats = torch.from_numpy(feats).to(dev, dtype)
    torch.manual_seed(0)
    net = build_ours().to(dev).to(dtype).eval()
    cuda = dev.type == "cuda"

    def sync():
        if cuda:
            torch.cuda.synchronize(dev)

    def forward():
        with torch.no_grad():
            return net(SparseTensor(feats, coords, SPARSE_SHAPE, batch_size=1))

    for _ in range(3):  # compiles, autotuning
        forward()
    sync()
    walls = []
    for _ in range(args.runs):
        t0 = time.perf_counter()
        forward()
        sync()
        walls.append((time.perf_counter() - t0) * 1e3)
    print(f"# SparseEncoder forward, {coords.shape[0]} voxels, {args.dtype}, {args.device}: "
          f"wall median {statistics.median(walls):.2f} ms (min {min(walls):.2f}) over {args.runs}")
    if cuda:
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as rec:
                warnings.simplefilter("always")
                forward()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        where: dict[str, int] = {}
        for w in rec:
            if "synchroniz" in str(w.message):
                key = f"{w.filename.split('/bevfusion/')[-1]}:{w.lineno}"
                where[key] = where.get(key, 0) + 1
        print(f"host syncs per forward: {sum(where.values())}")
        for k, v in sorted(where.items(), key=lambda kv: -kv[1]):
            print(f"  {v:4d}  {k}")
    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    with torch.profiler.profile(activities=acts) as prof:
        forward()
        sync()
    if cuda:
        busy = 0.0
        n = 0
        for e in prof.events():
            if e.device_type == torch.autograd.DeviceType.CUDA:
                busy += e.device_time_total if hasattr(e, "device_time_total") else e.cuda_time_total
                n += 1
        print(f"GPU busy {busy / 1e3:.2f} ms in {n} device events")
        try:
            print(prof.key_averages().table(sort_by="self_device_time_total", row_limit=args.top))
        except (KeyError, AttributeError, ValueError):  # older torch spells it cuda
            print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=args.top))
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
