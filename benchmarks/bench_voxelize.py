"""Voxelization: ours vs a naive Python loop and a sort-based torch version, in one run.

usage: python benchmarks/bench_voxelize.py [--device cpu|cuda] [--repeat N] [--threads T] [--skip-naive]
                                          [--small] [--quick] [--json PATH]

Scene: a synthetic ray-cast cloud of 10 sweeps (32 beams from -30 to +10 degrees x 1,000 azimuth steps,
hitting a ground plane 1.8 m below the sensor or a wall at an azimuth-dependent range of 15-70 m,
with 2 cm range noise; the ego moves 0.5 m per sweep), about 300k points with 5 features
(x, y, z, intensity, dt). BEVFusion's grid: point_range [-54, -54, -5, 54, 54, 3], voxel
(0.075, 0.075, 0.2) → 1440 x 1440 x 40 cells, max_points 10, max_voxels 120,000 (train) and
160,000 (test). `--small`: one sweep of 250 azimuth steps (8,000 points) for a quick check; `--quick`:
few repeats; `--json PATH`: the rows in the shared benchmark format (benchmarks/common.py).

Rows:
  naive loop        `impl="reference"`: a Python loop over the points with a dict (first-come)
  torch sort        the sort-based torch path (stable sort by cell key, segment starts, voxels ranked
                    by their first point), i.e. what a vectorised torch version costs on this device
  ours              `voxelize(..., impl="auto")`: numba hash-table pass on CPU, Triton kernels +
                    torch sort on CUDA
  ours + mean       voxelize then voxel_mean (BEVFusion's voxelize_reduce)
  ours dynamic mean voxelize_mean (DynamicScatter-style mean of all points per cell)
Every row's output is checked equal to ours (a mismatch is noted in the row and the run exits 1). The
naive loop is timed by the single call that gives the reference. On CUDA each row also gives the peak
memory of one call.
"""
from __future__ import annotations

import argparse
import datetime
import math
import os
import sys
import time
import traceback

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import JsonReport, Row, cuda_peak_mib, device_name, one_line, time_fn  # noqa: E402

from bevfusion.ops.voxelize import dynamic_voxelize, voxel_mean, voxelize, voxelize_mean  # noqa: E402
from bevfusion.ops.voxelize import sort_based as vox_sort  # noqa: E402

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


def _same(a, b) -> bool:
    """Equal outputs (the shorter tuple decides how many fields: slots are compared where both have them)."""
    return all(torch.equal(x.cpu(), y.cpu()) for x, y in zip(a, b))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeat", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--skip-naive", action="store_true", help="skip the Python-loop row (seconds per call)")
    ap.add_argument("--small", action="store_true", help="one short sweep instead of ten (a quick check)")
    ap.add_argument("--quick", action="store_true", help="few repeats")
    ap.add_argument("--json", default=None, metavar="PATH", help="write the rows here (shared benchmark format)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    repeat = args.repeat or ((10 if args.quick else 20) if cuda else (2 if args.quick else 5))
    points = (make_scene(sweeps=1, azimuths=250) if args.small else make_scene()).to(device)
    dev_name = device_name(device)
    report = JsonReport(args.json, "voxelize", dev_name)
    failed = []
    print(f"# bench_voxelize  {datetime.date.today()}  device: {dev_name}  torch {torch.__version__}")

    def row(rows, label, fn, expect=None, timed_device=device):
        """Time fn (its first call, where the peak memory is measured, also warms up); if `expect` is
        given, the output must equal it."""
        try:
            out, peak = cuda_peak_mib(fn, timed_device)
            note = ""
            if expect is not None and not _same(out, expect):
                note = "OUTPUT DIFFERS FROM OURS"
                failed.append(label)
            del out
            rows.append(Row(label, time_fn(fn, timed_device, warmup=1, repeat=repeat), note, peak_mib=peak))
        except Exception as e:  # noqa: BLE001 - recorded, the other rows still run
            traceback.print_exc()
            failed.append(label)
            report.skip(label, f"failed: {one_line(e)}")

    max_points = 10
    for max_voxels in (120_000, 160_000):
        title = f"hard voxelization, max_points {max_points}, max_voxels {max_voxels:,}"
        try:
            ours = voxelize(points, VOXEL, RANGE, max_points, max_voxels, return_slots=True)
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            failed.append(title)
            report.skip(title, f"ours failed: {one_line(e)}")
            continue
        m = ours[1].shape[0]
        kept = int((ours[3] >= 0).sum())
        in_range = int((dynamic_voxelize(points, VOXEL, RANGE)[:, 0] >= 0).sum())
        scene = f"points {points.shape[0]:,}, in range {in_range:,}, voxels {m:,}, points kept {kept:,}"
        print(f"\n{scene} (max_voxels {max_voxels:,})")
        rows = []
        if args.skip_naive:
            report.skip(f"naive loop (impl=reference), max_voxels {max_voxels:,}", "--skip-naive")
        else:
            try:  # one call: it is both the check and the timing (seconds per call)
                t0 = time.perf_counter()
                ref = voxelize(points.cpu(), VOXEL, RANGE, max_points, max_voxels, impl="reference",
                               return_slots=True)
                ms = (time.perf_counter() - t0) * 1e3
                same = _same(ours, ref)
                if not same:
                    failed.append("naive loop")
                rows.append(Row("naive loop (impl=reference)", ms, "Python dict, always on CPU, 1 call"
                                + ("" if same else "; OUTPUT DIFFERS FROM OURS")))
            except Exception as e:  # noqa: BLE001
                traceback.print_exc()
                failed.append("naive loop")
                report.skip("naive loop (impl=reference)", f"failed: {one_line(e)}")
        row(rows, "torch sort", lambda: vox_sort.hard_voxelize_sorted(points, VOXEL, RANGE, max_points, max_voxels),
            expect=ours)
        row(rows, "ours (impl=auto)", lambda: voxelize(points, VOXEL, RANGE, max_points, max_voxels), expect=ours)
        row(rows, "ours + voxel_mean",
            lambda: voxel_mean(*voxelize(points, VOXEL, RANGE, max_points, max_voxels)[::2]))
        if rows:
            rows[0].note = "; ".join(x for x in (rows[0].note, scene) if x)
        report.table(title, rows, "fp32", baseline="torch sort")
    rows = []
    row(rows, "ours voxelize_mean (all points)", lambda: voxelize_mean(points, VOXEL, RANGE))
    report.table("dynamic mean voxelization", rows, "fp32")
    if failed:
        print(f"rows that failed or differ: {failed}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
