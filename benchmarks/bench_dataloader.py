#!/usr/bin/env python3
"""Samples/s of the official training and test pipelines on a nuScenes-format dataset.

Prints the time of each transform (one process, per sample) and the throughput of a DataLoader with 0
and N workers, for the train pipeline (CBGS wrapper, all augmentations) and the test pipeline.

    python benchmarks/bench_dataloader.py --data data/synthetic --samples 40 --workers 2
"""
from __future__ import annotations

import argparse
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from bevfusion.config import load_config
from bevfusion.datasets.builder import build_dataset
from bevfusion.datasets.loader import build_dataloader

REPO = Path(__file__).resolve().parents[1]


def per_transform(dataset, n: int) -> dict[str, float]:
    """Mean ms per sample of every transform, running the pipeline by hand."""
    base = getattr(dataset, "dataset", dataset)
    totals: dict[str, float] = defaultdict(float)
    for i in range(n):
        results = base.get_data_info(i % len(base))
        for t in base.pipeline.transforms:
            start = time.perf_counter()
            results = t(results)
            totals[type(t).__name__] += (time.perf_counter() - start) * 1e3
            if results is None:
                break
    return {k: v / n for k, v in totals.items()}


def loader_rate(dataset, n: int, workers: int) -> float:
    loader = build_dataloader(dataset, samples_per_gpu=1, workers_per_gpu=workers, shuffle=True, seed=0)
    it = iter(loader)
    next(it)  # worker start-up is not counted
    start = time.perf_counter()
    count = 0
    for _ in range(n):
        try:
            next(it)
        except StopIteration:
            break
        count += 1
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=REPO / "data" / "synthetic")
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "nuscenes" / "default.yaml")
    parser.add_argument("--samples", type=int, default=40)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()

    cfg = load_config(args.config, [f"dataset_root={args.data.as_posix().rstrip('/')}/"])
    np.random.seed(0)
    print(f"# data loading, {args.data}, {args.samples} samples, {time.strftime('%Y-%m-%d')}")
    for name, section, kwargs in (("train", cfg.data.train, {}), ("test", cfg.data.test, {})):
        dataset = build_dataset(section, f"data.{name}", **kwargs)
        times = per_transform(dataset, min(args.samples, 20))
        print(f"\n## {name} pipeline: ms per sample and transform (1 process)")
        for k, v in times.items():
            print(f"| {k:<32} | {v:8.1f} |")
        print(f"| {'total':<32} | {sum(times.values()):8.1f} |")
        for workers in sorted({0, args.workers}):
            rate = loader_rate(dataset, args.samples, workers)
            print(f"{name}: {rate:.2f} samples/s with {workers} workers (batch 1)")


if __name__ == "__main__":
    main()
