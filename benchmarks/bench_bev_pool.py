"""BEV pooling: ours vs torch index_add, the LSS cumsum trick and the memory-traffic floor, in one run.

usage: python benchmarks/bench_bev_pool.py [--device cpu|cuda] [--small] [--dtypes fp32,fp16] [--repeat N]
                                          [--threads T] [--skip-lss] [--quick] [--json PATH]

Problem (BEVFusion's camera branch, GPU_ANCHORS.md): six synthetic pinhole cameras around the ego
(704 x 256 images, fx 560 px, rear camera 360 px), 118 depth bins (dbound [1, 60, 0.5]) x 32 x 88
feature pixels = 1,993,728 frustum points, 80 channels, pooled into a 360 x 360 x 1 grid (xbound /
ybound [-54, 54, 0.3], zbound [-10, 10, 20]) with the official truncating coordinates. `--small`
shrinks it (2 cameras, 30 bins, 16 x 44 pixels, 90 x 90 grid) for a quick check.

`--quick` takes few repeats (the LSS row once: about 0.65 s per call on a GPU); `--json PATH` writes the
rows in the shared benchmark format (benchmarks/common.py), rewritten after every table.

Every method writes the (B*D*H*W, C) channels-last cell table (BEVFusion's (B, Z, X, Y, C) before
its final permute; our (B, C, D, H, W) result is a view of it). Rows:
  floor             (N*C read + G*C write) x bytes / measured copy bandwidth (read + write counted),
                    and / the datasheet bandwidth where the GPU is known (H200: 4.8 TB/s)
  floor'            kept rows + output + int64 order + cell pointers: what a gather-reduce must move
  ours, cached plan bev_pool_with_plan(feats, plan): the reduction only (fixed rig, inference)
  ours, no plan     bev_pool(feats, coords, B, grid): mask + rank + sort + reduction, per frame
  ours, plan only   bev_pool_plan(coords, B, grid)
  index_add cached  ranks precomputed (dropped points -> a dummy row), zero fill + index_add_
  scatter_add_      the same with scatter_add_ over an expanded (stride-0) index
  index_add         per frame: rank, mask, feats[kept], zero fill, index_add_
  LSS cumsum        per frame: rank, mask, argsort, gather, cumsum(0) over the outer dimension,
                    boundary diff, scatter (as LSS's QuickCumsum forward; on CUDA this torch scan
                    is the slow one that GPU_ANCHORS rows B / E1 time)
Forward + backward (loss gradient = random (G, C)): ours (cached plan) vs index_add (cached ranks).
Fused lift + pool (depth (BN, D, fH, fW) x feats (BN, fH, fW, C)): materialise the frustum features
then pool (cached plan) vs lift_bev_pool (cached plan), forward and forward + backward.
Every output is checked against a float64 reference (relerr = |out - ref| / |ref|). On CUDA each row
also gives the peak memory of one call (allocated on top of the inputs, the output included).
"""
from __future__ import annotations

import argparse
import datetime
import math
import os
import sys
import traceback

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (JsonReport, Record, Row, copy_bandwidth, cuda_peak_mib, datasheet_bandwidth,  # noqa: E402
                    device_name, one_line, speedup, time_fn)

from bevfusion.ops.bev_pool import (bev_pool, bev_pool_plan, bev_pool_with_plan, grid_from_bounds,  # noqa: E402
                                    lift_bev_pool, points_to_bev_coords)
from bevfusion.ops.bev_pool.reference import lift_reference  # noqa: E402

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


# ----------------------------------------------------------------------------- problem
def make_geometry(n_cams: int, dbound, fh: int, fw: int, img_w=704, img_h=256) -> torch.Tensor:
    """(1, n_cams, D, fH, fW, 3) metric points of six ego-mounted pinholes (x forward, y left, z up)."""
    yaws = [0.0, -55.0, 55.0, 180.0, -110.0, 110.0][:n_cams]
    fxs = [560.0, 560.0, 560.0, 360.0, 560.0, 560.0][:n_cams]
    d = torch.arange(*dbound, dtype=torch.float32)
    u = torch.linspace(0, img_w - 1, fw)
    v = torch.linspace(0, img_h - 1, fh)
    dd, vv, uu = torch.meshgrid(d, v, u, indexing="ij")  # (D, fH, fW)
    cams = []
    for yaw, fx in zip(yaws, fxs):
        t = math.radians(yaw)
        fwd = torch.tensor([math.cos(t), math.sin(t), 0.0])
        left = torch.tensor([-math.sin(t), math.cos(t), 0.0])
        up = torch.tensor([0.0, 0.0, 1.0])
        pos = torch.tensor([1.0, 0.0, 1.6]) + 0.8 * fwd
        right_c = (uu - img_w / 2) / fx * dd
        down_c = (vv - img_h / 2) / fx * dd
        pts = pos + dd[..., None] * fwd - right_c[..., None] * left - down_c[..., None] * up
        cams.append(pts)
    return torch.stack(cams)[None]


def make_problem(small: bool, device, seed=0):
    if small:
        n_cams, dbound, fh, fw, c = 2, (1.0, 16.0, 0.5), 16, 44, 80
        bounds = ([-13.5, 13.5, 0.3], [-13.5, 13.5, 0.3], [-10.0, 10.0, 20.0])
    else:
        n_cams, dbound, fh, fw, c = 6, (1.0, 60.0, 0.5), 32, 88, 80
        bounds = ([-54.0, 54.0, 0.3], [-54.0, 54.0, 0.3], [-10.0, 10.0, 20.0])
    geom = make_geometry(n_cams, dbound, fh, fw)
    dx, lower, nx = grid_from_bounds(*bounds)
    coords = points_to_bev_coords(geom, dx, lower, nx).to(device)
    grid = (nx[2], nx[0], nx[1])
    g = torch.Generator().manual_seed(seed)
    d_bins = geom.shape[2]
    logits = torch.randn(n_cams, d_bins, fh, fw, generator=g)
    depth = logits.softmax(1).to(device)
    img = torch.randn(n_cams, fh, fw, c, generator=g).to(device)
    return coords, grid, depth, img


# ----------------------------------------------------------------------------- peers
def cells_of(coords, batch_size, grid):
    d, h, w = grid
    x, y, z, b = coords.unbind(1)
    keep = (x >= 0) & (x < h) & (y >= 0) & (y < w) & (z >= 0) & (z < d) & (b >= 0) & (b < batch_size)
    return keep, ((b * d + z) * h + x) * w + y


def index_add_per_frame(feats, coords, batch_size, grid):
    keep, cells = cells_of(coords, batch_size, grid)
    g = batch_size * grid[0] * grid[1] * grid[2]
    out = feats.new_zeros(g, feats.shape[1])
    return out.index_add_(0, cells[keep], feats[keep])


def index_add_cached(feats, cells_dummy, g):
    out = feats.new_zeros(g + 1, feats.shape[1])
    return out.index_add_(0, cells_dummy, feats)[:g]


def scatter_add_cached(feats, cells_dummy, g):
    out = feats.new_zeros(g + 1, feats.shape[1])
    return out.scatter_add_(0, cells_dummy[:, None].expand(-1, feats.shape[1]), feats)[:g]


def lss_cumsum(feats, coords, batch_size, grid):
    """LSS's cumsum trick (QuickCumsum forward) in plain torch, writing the (G, C) cell table."""
    keep, cells = cells_of(coords, batch_size, grid)
    x, ranks = feats[keep], cells[keep]
    sorts = ranks.argsort()
    x, ranks = x[sorts], ranks[sorts]
    x = x.cumsum(0)
    last = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
    last[:-1] = ranks[1:] != ranks[:-1]
    x, ranks = x[last], ranks[last]
    x = torch.cat((x[:1], x[1:] - x[:-1]))
    g = batch_size * grid[0] * grid[1] * grid[2]
    out = feats.new_zeros(g, feats.shape[1])
    out[ranks] = x
    return out


# ----------------------------------------------------------------------------- helpers
def relerr(out, ref) -> float:
    out = out.double().reshape(ref.shape)
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


def cells_view(bev):
    """(B, C, D, H, W) -> (G, C) without copying our channels-last result."""
    return bev.permute(0, 2, 3, 4, 1).reshape(-1, bev.shape[1])


# Row labels that tools/gpu_check.py looks up for its headline.
OURS_CACHED = "ours, cached plan"
FLOOR_MEASURED = "floor, measured copy bandwidth"
FLOOR_DATASHEET = "floor, datasheet bandwidth"


class Bench:
    """Runs rows one by one; a row that raises is recorded as skipped with its reason (and the run
    exits non-zero at the end) instead of ending the benchmark."""

    def __init__(self, report: JsonReport, device: torch.device):
        self.report, self.device, self.failed = report, device, []

    def row(self, label, fn, repeat, dtype_name, warmup=1, check=None):
        """Time `fn`; its first call (peak memory measured there) also warms up and gives the output
        that `check(out) -> (relerr, note)` compares. Returns a Row or None if it failed."""
        try:
            out, peak = cuda_peak_mib(fn, self.device)
            err, note = check(out) if check is not None else (None, "")
            del out
            ms = time_fn(fn, self.device, warmup=warmup, repeat=repeat)
        except Exception as e:  # noqa: BLE001 - recorded, the other rows still run
            traceback.print_exc()
            self.failed.append(label)
            self.report.skip(f"{label} [{dtype_name}]", f"failed: {one_line(e)}")
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            return None
        return Row(label, ms, note, relerr=err, peak_mib=peak)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--dtypes", default=None, help="fp32,fp16,bf16 (default: fp32 on CPU, fp32,fp16 on CUDA)")
    ap.add_argument("--repeat", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None, help="torch (and our numba) CPU threads")
    ap.add_argument("--skip-lss", action="store_true", help="skip the LSS cumsum row (slow)")
    ap.add_argument("--quick", action="store_true", help="few repeats (the slow peers once or twice)")
    ap.add_argument("--json", default=None, metavar="PATH", help="write the rows here (shared benchmark format)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    dtypes = (args.dtypes or ("fp32,fp16" if cuda else "fp32")).split(",")
    bad = [d for d in dtypes if d not in DTYPES]
    if bad:
        ap.error(f"--dtypes: unknown {bad} (choose from {sorted(DTYPES)})")
    if args.quick:
        rep, slow_rep, lss_rep = (10, 3, 1) if cuda else (2, 1, 1)
    else:
        rep, slow_rep, lss_rep = (20, 5, 5) if cuda else (3, 2, 2)
    if args.repeat:
        rep = args.repeat

    dev_name = device_name(device)
    report = JsonReport(args.json, "bev_pool", dev_name)
    bench = Bench(report, device)
    coords, grid, depth, img = make_problem(args.small, device)
    b = 1
    n = coords.shape[0]
    c = img.shape[-1]
    plan = bev_pool_plan(coords, b, grid)
    g = plan.num_cells
    k = plan.num_kept
    lengths = plan.interval_lengths.float()
    keep, cells = cells_of(coords, b, grid)
    cells_dummy = torch.where(keep, cells, torch.full_like(cells, g))
    bw = copy_bandwidth(device)
    bw_sheet = datasheet_bandwidth(dev_name) if cuda else None

    print(f"# bench_bev_pool  {datetime.date.today()}  device: {dev_name}  torch {torch.__version__}")
    problem = (f"N = {n:,} points (kept {k:,} = {100 * k / n:.1f}%), C = {c}, grid (D, H, W) = {grid}, "
               f"non-empty cells {plan.num_intervals:,} of {g:,}")
    print(f"points {problem}; interval length mean {lengths.mean():.1f}, max {int(lengths.max())}; "
          f"copy bandwidth {bw / 1e9:.1f} GB/s (read + write)")
    if cuda and bw_sheet is None:
        report.skip(FLOOR_DATASHEET, f"no datasheet bandwidth known for {dev_name!r} (benchmarks/common.py)")

    for name in dtypes:
        dt = DTYPES[name]
        es = torch.empty((), dtype=dt).element_size()
        feats = lift_reference(depth, img).to(dt).contiguous()  # (N, C), the frustum features
        ref = index_add_per_frame(feats.double(), coords, b, grid)

        def vs_ref(view=None):
            return lambda out: (relerr(view(out) if view else out, ref), "")

        def add(rows, label, fn, repeat=rep, check=None, warmup=1):
            r = bench.row(label, fn, repeat, name, warmup=warmup, check=check)
            if r is not None:
                rows.append(r)
            return r

        # forward: ours vs the peers
        rows = []
        ours = add(rows, OURS_CACHED, lambda: bev_pool_with_plan(feats, plan), check=vs_ref(cells_view))
        add(rows, "ours, no plan (plan + reduce)", lambda: bev_pool(feats, coords, b, grid), check=vs_ref(cells_view))
        add(rows, "ours, plan only", lambda: (bev_pool_plan(coords, b, grid), None)[1])
        add(rows, "index_add, cached ranks", lambda: index_add_cached(feats, cells_dummy, g), slow_rep,
            check=vs_ref())
        add(rows, "scatter_add_, cached ranks", lambda: scatter_add_cached(feats, cells_dummy, g), slow_rep,
            check=vs_ref())
        add(rows, "index_add, per frame", lambda: index_add_per_frame(feats, coords, b, grid), slow_rep,
            check=vs_ref())
        if args.skip_lss:
            report.skip(f"LSS cumsum trick, per frame [{name}]", "--skip-lss")
        else:
            add(rows, "LSS cumsum trick, per frame", lambda: lss_cumsum(feats, coords, b, grid), lss_rep,
                check=vs_ref(), warmup=0 if args.quick else 1)
        report.table(f"forward, {name}", rows, name, baseline="index_add, cached ranks")

        # forward vs the memory floor
        nbytes = (n * c + g * c) * es
        floors = [Row(FLOOR_MEASURED, nbytes / bw * 1e3,
                      f"(N*C read + G*C write) = {nbytes / 1e6:.0f} MB at {bw / 1e9:.0f} GB/s measured; {problem}")]
        if bw_sheet:
            floors.append(Row(FLOOR_DATASHEET, nbytes / bw_sheet * 1e3,
                              f"{nbytes / 1e6:.0f} MB at {bw_sheet / 1e12:.2f} TB/s datasheet"))
        nbytes2 = (k * c + g * c) * es + k * 8 + (g + 1) * 8
        floors.append(Row("floor' (kept rows + out + order + ptr), measured bandwidth", nbytes2 / bw * 1e3,
                          f"{nbytes2 / 1e6:.0f} MB"))
        floor_ms = floors[1].ms if bw_sheet else floors[0].ms
        report.table(f"memory floor, {name}", floors, name)
        if ours is not None:
            x_meas = speedup(floors[0].ms, ours.ms)
            report.add(Record(table=f"memory floor, {name}", what=OURS_CACHED, dtype=name, ms=ours.ms,
                              ratio=speedup(floor_ms, ours.ms), ratio_vs="floor", peak_mib=ours.peak_mib,
                              relerr=ours.relerr,
                              note=(f"vs the {'datasheet' if bw_sheet else 'measured'} floor; "
                                    f"{x_meas:.2f} of the measured-bandwidth floor's speed")))
            print(f"ours, cached plan: {ours.ms / floor_ms:.2f}x the floor's time "
                  f"({'datasheet' if bw_sheet else 'measured'} bandwidth), {ours.ms / floors[0].ms:.2f}x at "
                  "the measured copy bandwidth")

        # forward + backward
        grad = torch.randn(g, c, generator=torch.Generator().manual_seed(1)).to(device, dt)
        ref_grad = torch.where(keep[:, None], grad.double()[cells.clamp(0, g - 1)], 0.0)
        rows = []
        fr = feats.detach().requires_grad_()

        def ours_fb():
            out = cells_view(bev_pool_with_plan(fr, plan))
            return torch.autograd.grad(out, fr, grad)[0]

        def index_add_fb():
            out = fr.new_zeros(g + 1, c).index_add(0, cells_dummy, fr)[:g]
            return torch.autograd.grad(out, fr, grad)[0]

        def vs_grad(gr):
            return relerr(gr, ref_grad), "feature gradient"

        add(rows, "ours fwd+bwd, cached plan", ours_fb, check=vs_grad)
        add(rows, "index_add fwd+bwd, cached ranks", index_add_fb, slow_rep, check=vs_grad)
        report.table(f"forward + backward, {name}", rows, name, baseline="index_add fwd+bwd, cached ranks")
        del fr, grad, ref_grad

        # fused lift + pool
        dep, im = depth.to(dt), img.to(dt)
        rows = []
        bytes_fused = (n * es + k * 8 + (g + 1) * 8 + g * c * es + im.numel() * es)
        rows.append(Row("fused floor (depth + order + ptr + out + feats)", bytes_fused / bw * 1e3,
                        "measured copy bandwidth"))
        add(rows, "materialise + pool, cached plan", lambda: bev_pool_with_plan(lift_reference(dep, im), plan),
            check=vs_ref(cells_view))
        add(rows, "lift_bev_pool, cached plan", lambda: lift_bev_pool(dep, im, plan=plan), check=vs_ref(cells_view))
        dr, ir = dep.detach().requires_grad_(), im.detach().requires_grad_()
        gcells = torch.randn(g, c, generator=torch.Generator().manual_seed(2)).to(device, dt)

        def mat_fb():
            out = cells_view(bev_pool_with_plan(lift_reference(dr, ir), plan))
            return torch.autograd.grad(out, (dr, ir), gcells)

        def fused_fb():
            out = cells_view(lift_bev_pool(dr, ir, plan=plan))
            return torch.autograd.grad(out, (dr, ir), gcells)

        try:
            ref_fb = [t.double() for t in mat_fb()]
        except Exception as e:  # noqa: BLE001
            ref_fb = None
            report.skip(f"fused lift + pool fwd+bwd relerr [{name}]", f"reference failed: {one_line(e)}")

        def vs_mat(out):
            if ref_fb is None:
                return None, ""
            ed, ef = relerr(out[0], ref_fb[0]), relerr(out[1], ref_fb[1])
            return max(ed, ef), f"grad relerr vs the materialised path: depth {ed:.1e} feats {ef:.1e}"

        add(rows, "materialise + pool fwd+bwd", mat_fb, check=vs_mat)
        add(rows, "lift_bev_pool fwd+bwd", fused_fb, check=vs_mat)
        report.table(f"fused lift + pool, {name}", rows, name, baseline="materialise + pool, cached plan",
                     ratio_vs={"materialise + pool fwd+bwd": (None, None), rows[0].name: (None, None),
                               "lift_bev_pool fwd+bwd": ("materialise + pool fwd+bwd",
                                                         next((r.ms for r in rows
                                                               if r.name == "materialise + pool fwd+bwd"), None))})
        del feats, ref, dr, ir, ref_fb
    if bench.failed:
        print(f"rows that failed: {bench.failed}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
