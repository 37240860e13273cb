"""Voxelization: ours vs a naive Python loop and a sort-based torch version, in one run.

usage: python benchmarks/bench_voxelize.py [--device cpu|cuda] [--repeat N] [--threads T] [--skip-naive]

Scene: a synthetic ray-cast cloud of 10 sweeps (32 beams from -30 to +10 degrees x 1,000 azimuth steps,
hitting a ground plane 1.8 m below the sensor or a wall at an azimuth-dependent range of 15-70 m,
with 2 cm range noise; the ego moves 0.5 m per sweep), about 300k points with 5 features
(x, y, z, intensity, dt). BEVFusion's grid: point_range [-54, -54, -5, 54, 54, 3], voxel
(0.075, 0.075, 0.2) → 1440 x 1440 x 40 cells, max_points 10, max_voxels 120,000 (train) and
160,000 (test).

Rows:
  naive loop        `impl="reference"`: a Python loop over the points with a dict (first-come)
  torch sort        the sort-based torch path (stable sort by cell key, segment starts, voxels ranked
                    by their first point), i.e. what a vectorised torch version costs on this device
  ours              `voxelize(..., impl="auto")`: numba hash-table pass on CPU, Triton kernels +
                    torch sort on CUDA
  ours + mean       voxelize then voxel_mean (BEVFusion's voxelize_reduce)
  ours dynamic mean voxelize_mean (DynamicScatter-style mean of all points per cell)
Every row's output is checked equal to ours.
"""
from __future__ import annotations

import argparse
import datetime
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import Row, device_name, print_table, time_fn  # noqa: E402

from bevfusion.ops.voxelize import dynamic_voxelize, voxel_mean, voxelize, voxelize_mean  # noqa: E402
from bevfusion.ops.voxelize import cpu as vox_cpu  # noqa: E402

VOXEL = (0.075, 0.075, 0.2)
RANGE = (-54.0, -54.0, -5.0, 54.0, 54.0, 3.0)


def make_scene(sweeps: int = 10, beams: int = 32, azimuths: int = 1000, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    elev = torch.linspace(math.radians(-30), math.radians(10), beams)
    az = torch.linspace(-math.pi, math.pi, azimuths + 1)[:-1]
    # wall range: a smooth random function of azimuth (a few harmonics)
    k = torch.arange(1, 6, dtype=torch.float32)
    coef = torch.randn(5, 2, generator=gen) / k[:, None]
    wall = 40 + 12 * (coef[:, 0:1] * torch.cos(k[:, None] * az) + coef[:, 1:2] * torch.sin(k[:, None] * az)).sum(0)
    wall = wall.clamp(15, 70)
    e, a = torch.meshgrid(elev, az, indexing="ij")  # (beams, azimuths)
    ground = torch.where(e < 0, 1.8 / torch.tan(-e).clamp(min=1e-3), torch.full_like(e, 1e9))
    rng = torch.minimum(ground, wall.expand_as(e) / torch.cos(e))
    clouds = []
    for s in range(sweeps):
        r = rng + 0.02 * torch.randn(rng.shape, generator=gen)
        x = r * torch.cos(e) * torch.cos(a) - 0.5 * s  # older sweeps sit behind the ego
        y = r * torch.cos(e) * torch.sin(a)
        z = r * torch.sin(e)
        inten = torch.rand(rng.shape, generator=gen) * 255
        dt = torch.full_like(x, 0.05 * s)
        clouds.append(torch.stack([x, y, z, inten, dt], -1).reshape(-1, 5))
    return torch.cat(clouds)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeat", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--skip-naive", action="store_true", help="skip the Python-loop row (seconds per call)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    repeat = args.repeat or (20 if device.type == "cuda" else 5)
    points = make_scene().to(device)
    print(f"# bench_voxelize  {datetime.date.today()}  device: {device_name(device)}  torch {torch.__version__}")
    for max_voxels in (120_000, 160_000):
        ours = voxelize(points, VOXEL, RANGE, 10, max_voxels, return_slots=True)
        m = ours[1].shape[0]
        kept = int((ours[3] >= 0).sum())
        print(f"\npoints {points.shape[0]:,}, in range {int((dynamic_voxelize(points, VOXEL, RANGE)[:, 0] >= 0).sum()):,}, "
              f"voxels {m:,} (max_voxels {max_voxels:,}), points kept {kept:,}")
        rows = []
        if not args.skip_naive:
            ref = voxelize(points.cpu(), VOXEL, RANGE, 10, max_voxels, impl="reference", return_slots=True)
            assert all(torch.equal(a.cpu(), b) for a, b in zip(ours, ref))
            rows.append(Row("naive loop (impl=reference)", time_fn(
                lambda: voxelize(points.cpu(), VOXEL, RANGE, 10, max_voxels, impl="reference"), "cpu", warmup=0,
                repeat=1), "Python dict, always on CPU"))
        srt = vox_cpu.hard_voxelize_sorted(points, VOXEL, RANGE, 10, max_voxels)
        assert all(torch.equal(a, b) for a, b in zip(srt, ours))
        rows.append(Row("torch sort", time_fn(lambda: vox_cpu.hard_voxelize_sorted(points, VOXEL, RANGE, 10, max_voxels),
                                              device, repeat=repeat)))
        rows.append(Row("ours (impl=auto)", time_fn(lambda: voxelize(points, VOXEL, RANGE, 10, max_voxels),
                                                    device, repeat=repeat)))
        rows.append(Row("ours + voxel_mean", time_fn(
            lambda: voxel_mean(*voxelize(points, VOXEL, RANGE, 10, max_voxels)[::2]), device, repeat=repeat)))
        print_table(f"hard voxelization, max_points 10, max_voxels {max_voxels:,}", rows,
                    baseline="naive loop (impl=reference)" if not args.skip_naive else "torch sort")
    rows = [Row("ours voxelize_mean (all points)", time_fn(lambda: voxelize_mean(points, VOXEL, RANGE), device,
                                                          repeat=repeat))]
    print_table("dynamic mean voxelization", rows)


if __name__ == "__main__":
    main()
