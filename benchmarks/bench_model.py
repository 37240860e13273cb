#!/usr/bin/env python3
"""Per-module latency of a whole BEVFusion model on real inputs, and end to end.

Builds a config's model, takes samples through the config's test pipeline (default: the released
fusion detector on the synthetic drive, official resolution), and times each top-level module with
forward hooks: camera backbone, neck, view transform (with its bev_pool step separately), voxelize,
sparse encoder, fuser, decoder, heads, plus the whole forward including decoding. Prints ms per module
(median over the timed runs), frames/s and peak memory (CUDA).

    python benchmarks/bench_model.py [--config CFG] [--data data/synthetic] [--device cuda] \
        [--dtype fp32|fp16|bf16] [--runs 5]
"""
from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict
from pathlib import Path

import torch

from bevfusion.config import load_config
from bevfusion.datasets.builder import build_dataset
from bevfusion.datasets.collate import collate
from bevfusion.evaluation.runner import move_batch
from bevfusion.models import build_model

from common import device_name, peak_memory_mb, sync

REPO = Path(__file__).resolve().parents[1]
DEFAULT = REPO / "configs/nuscenes/det/transfusion/secfpn/camera+lidar/swint_v0p075/convfuser.yaml"
PARTS = ("encoders.camera.backbone", "encoders.camera.neck", "encoders.camera.vtransform",
         "encoders.lidar.voxelize", "encoders.lidar.backbone", "fuser", "decoder.backbone", "decoder.neck",
         "heads.object", "heads.map")


class Timer:
    """Forward pre/post hooks recording wall time per named module (synchronising on CUDA)."""

    def __init__(self, device: torch.device):
        self.device, self.times, self._start = device, defaultdict(list), {}

    def attach(self, name: str, module: torch.nn.Module) -> None:
        def pre(_m, _inp):
            sync(self.device)
            self._start[name] = time.perf_counter()

        def post(_m, _inp, _out):
            sync(self.device)
            self.times[name].append((time.perf_counter() - self._start[name]) * 1e3)

        module.register_forward_pre_hook(pre)
        module.register_forward_hook(post)

    def wrap_method(self, name: str, obj, attr: str) -> None:
        fn = getattr(obj, attr)

        def timed(*args, **kwargs):
            sync(self.device)
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            sync(self.device)
            self.times[name].append((time.perf_counter() - start) * 1e3)
            return out

        setattr(obj, attr, timed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=DEFAULT)
    parser.add_argument("--data", type=Path, default=REPO / "data" / "synthetic")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"],
                        help="autocast dtype for the forward (fp16 needs CUDA)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    args = parser.parse_args()

    device = torch.device(args.device)
    cfg = load_config(args.config, [f"dataset_root={args.data.as_posix().rstrip('/')}/"])
    model = build_model(cfg.model).to(device).eval()
    dataset = build_dataset(cfg.data.test, "data.test", filter_empty_gt=False)
    batches = [move_batch(collate([dataset[i % len(dataset)]]), device) for i in range(args.warmup + args.runs)]
    timer = Timer(device)
    named = dict(model.named_modules())
    for part in PARTS:
        if part in named:
            timer.attach(part, named[part])
    if "encoders.camera.vtransform" in named and hasattr(named["encoders.camera.vtransform"], "pool"):
        timer.wrap_method("  of which lift + bev_pool", named["encoders.camera.vtransform"], "pool")
    dtype = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    totals = []
    with torch.no_grad():
        for i, batch in enumerate(batches):
            if i == args.warmup:
                timer.times.clear()
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
            sync(device)
            start = time.perf_counter()
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                model(batch)
            sync(device)
            if i >= args.warmup:
                totals.append((time.perf_counter() - start) * 1e3)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"# {args.config.relative_to(REPO) if args.config.is_relative_to(REPO) else args.config}")
    print(f"# {device_name(device)}, {args.dtype}, batch 1, {args.runs} runs, {n_params / 1e6:.1f} M parameters, "
          f"{time.strftime('%Y-%m-%d')}")
    print(f"| {'module':<34} | {'ms (median)':>12} |")
    print(f"|{'-' * 36}|{'-' * 14}|")
    for name in list(PARTS[:3]) + ["  of which lift + bev_pool"] + list(PARTS[3:]):
        if name in timer.times:
            print(f"| {name:<34} | {statistics.median(timer.times[name]):>12.1f} |")
    total = statistics.median(totals)
    print(f"| {'end to end (incl. decoding)':<34} | {total:>12.1f} |")
    print(f"frames/s: {1e3 / total:.2f}")
    peak = peak_memory_mb(device)
    if peak is not None:
        print(f"peak memory: {peak:.0f} MiB")


if __name__ == "__main__":
    main()
