"""Launch-parameter sweep of the BEV-pool forward kernels (`_pool_fwd_kernel`, `_lift_fwd_kernel`).

usage: python benchmarks/tune_bev_pool.py [--device cuda|cpu] [--small] [--dtypes fp32,fp16] [--kernels pool,lift]
                                          [--configs PxWxC,...] [--repeat N] [--inner K] [--json PATH]

Problem: bench_bev_pool.py's (its `make_problem`: 1,993,728 frustum points x 80 channels -> 360 x 360 cells),
plan built once. `--small` is a tiny problem (1 camera, 256 points, 12 x 12 cells, still 80 channels) for
the CPU under TRITON_INTERPRET=1 (set automatically with --device cpu): it checks the script, not speed.

For each dtype and kernel the kernel is launched directly (as the launchers in
bevfusion/ops/bev_pool/triton.py do: one program per entry of plan.launch_cells x channel blocks) with each
config: BLOCK_P (points per step) in {2, 4, 8, 16, 32} x num_warps in {1, 2, 4} with BLOCK_C = 128 (one
channel block, 80 of 128 lanes used), and BLOCK_C = 64 (channel grid of 2: 64 + 16 channels) with num_warps
in {1, 2}; `--configs 4x1x128,16x2x64` (BLOCK_P x num_warps x BLOCK_C) sweeps those instead. The current
default (`_fwd_meta`) always runs first and is the ratio baseline.

Each config: output poisoned with NaN, one call (compiles; its wall time is noted), checked element by
element against a float64 reference (|out - ref| <= tol * sum|terms| of the cell; every element must be
written) and by relerr = |out - ref| / |ref|; then timed. On CUDA, `ms` is the median over `--repeat` CUDA-
event samples of `--inner` back-to-back launches each (GPU time per call, launch latency hidden); the note
also gives the single-call median bracketed by events like bench_bev_pool.py's rows (latency included). A
config that fails to compile, raises or is wrong is recorded as skipped with a one-line reason and the
sweep goes on (a CUDA error that kills the context ends it: the rest is skipped with that reason).

Prints one markdown table per kernel and dtype, then the best config per (kernel, dtype) against the
default and the memory floor (pool: N*C read + G*C write; lift: depth + order + cell pointers + output +
image features; datasheet bandwidth where known, else the measured copy bandwidth). `--json PATH` writes
the rows in the shared format (benchmarks/common.py), rewritten after every table.
"""
from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time
import traceback
from dataclasses import dataclass

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (JsonReport, Record, Row, copy_bandwidth, datasheet_bandwidth, device_name,  # noqa: E402
                    one_line, print_table, speedup, time_fn)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
KERNELS = ("pool", "lift")
KERNEL_NAMES = {"pool": "_pool_fwd_kernel", "lift": "_lift_fwd_kernel"}
# Element-wise tolerance, relative to the sum of |terms| of the cell (fp32: accumulation over up to ~1000
# terms; half types: the rounding of the output), plus an absolute term for fp16 subnormals.
TOL = {"fp32": (1e-4, 0.0), "fp16": (2e-3, 1e-6), "bf16": (1e-2, 0.0)}
BLOCK_PS = (2, 4, 8, 16, 32)


@dataclass(frozen=True)
class Config:
    block_p: int
    num_warps: int
    block_c: int

    @property
    def label(self) -> str:
        return f"P{self.block_p} w{self.num_warps} C{self.block_c}"

    def meta(self) -> dict:
        return dict(BLOCK_P=self.block_p, BLOCK_C=self.block_c, num_warps=self.num_warps)


def sweep_configs() -> list[Config]:
    out = [Config(p, w, 128) for w in (1, 2, 4) for p in BLOCK_PS]
    return out + [Config(p, w, 64) for w in (1, 2) for p in BLOCK_PS]


def parse_configs(text: str) -> list[Config]:
    out = []
    for item in text.split(","):
        parts = item.strip().lower().split("x")
        try:
            p, w, c = (int(x) for x in parts)
        except ValueError:
            raise ValueError(f"--configs: {item!r} is not BLOCK_PxNUM_WARPSxBLOCK_C (e.g. 4x1x128)") from None
        if min(p, w, c) < 1:
            raise ValueError(f"--configs: {item!r}: values must be positive")
        out.append(Config(p, w, c))
    return out


def tiny_problem(device):
    """1 camera, 8 depth bins x 4 x 8 pixels = 256 points, 80 channels, 12 x 12 x 1 grid (1.5 m cells)."""
    from bench_bev_pool import make_geometry

    from bevfusion.ops.bev_pool import grid_from_bounds, points_to_bev_coords

    n_cams, dbound, fh, fw, c = 1, (1.0, 9.0, 1.0), 4, 8, 80
    geom = make_geometry(n_cams, dbound, fh, fw)
    dx, lower, nx = grid_from_bounds([-9.0, 9.0, 1.5], [-9.0, 9.0, 1.5], [-10.0, 10.0, 20.0])
    coords = points_to_bev_coords(geom, dx, lower, nx).to(device)
    g = torch.Generator().manual_seed(0)
    depth = torch.randn(n_cams, geom.shape[2], fh, fw, generator=g).softmax(1).to(device)
    img = torch.randn(n_cams, fh, fw, c, generator=g).to(device)
    return coords, (nx[2], nx[0], nx[1]), depth, img


class WrongResult(Exception):
    pass


def check_output(out: torch.Tensor, ref: torch.Tensor, ref_abs: torch.Tensor, rtol: float, atol: float):
    """(relerr, None) if every element of `out` (G, C) is finite and |out - ref| <= rtol * ref_abs + atol,
    else (relerr or None, one-line reason)."""
    o = out.double()
    finite = torch.isfinite(o)
    err = (o - ref).abs()
    bad = ~finite | (err > rtol * ref_abs + atol)
    nbad = int(bad.sum())
    rel = float((o - ref).norm() / ref.norm().clamp_min(1e-30)) if bool(finite.all()) else None
    if not nbad:
        return rel, None
    nonfinite = int((~finite).sum())
    err = torch.where(finite, err, torch.full_like(err, float("inf")))
    i = int(err.argmax())
    cell, ch = divmod(i, out.shape[1])
    return rel, (f"wrong: {nbad} of {out.numel()} elements ({nonfinite} not finite / unwritten) outside "
                 f"{rtol:g} * sum|terms| + {atol:g}; worst cell {cell} channel {ch}: got {float(o.view(-1)[i]):.6g}, "
                 f"expected {float(ref.view(-1)[i]):.6g}")


def gpu_ms(fn, repeat: int, inner: int, warmup: int = 2) -> float:
    """Median GPU time per call (ms) over `repeat` event samples of `inner` back-to-back calls."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(inner):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / inner)
    return statistics.median(times)


@dataclass
class Case:
    """One (kernel, dtype): launch(cfg, out) runs the kernel into `out` (G, C); ref, ref_abs (G, C) float64: the
    cell sums of the terms and of their absolute values."""
    kernel: str
    dtype: str
    launch: object
    out: torch.Tensor
    ref: torch.Tensor
    ref_abs: torch.Tensor
    floor_bytes: float
    inputs: tuple  # pool: (feats (N, C),); lift: (depth (BN, D, fH, fW), feats (BN, fH, fW, C))


def build_cases(kernel: str, dname: str, plan, depth, img, kernels) -> Case:
    from bevfusion.ops.bev_pool.reference import lift_reference, pool_cells_reference

    dt = DTYPES[dname]
    es = torch.empty((), dtype=dt).element_size()
    n, c = plan.num_points, img.shape[-1]
    g, k = plan.num_cells, plan.num_kept
    out = torch.empty(g, c, dtype=dt, device=img.device)
    if kernel == "pool":
        feats = lift_reference(depth, img).to(dt).contiguous()  # (N, C), bench_bev_pool's frustum features
        ref = pool_cells_reference(feats.double(), plan.point_cells, g)
        ref_abs = pool_cells_reference(feats.double().abs(), plan.point_cells, g)
        floor_bytes = (n * c + g * c) * es

        def launch(cfg: Config, out: torch.Tensor):
            kernels._pool_fwd_kernel[(g, -(-c // cfg.block_c))](
                feats, plan.order, plan.cell_ptr, plan.launch_cells, out, c, IS_F64=False, **cfg.meta())
    else:
        dep, im = depth.to(dt).contiguous(), img.to(dt).contiguous()
        _, d_bins, fh, fw = dep.shape
        frustum = lift_reference(dep.double(), im.double())
        ref = pool_cells_reference(frustum, plan.point_cells, g)
        ref_abs = pool_cells_reference(frustum.abs(), plan.point_cells, g)
        del frustum
        floor_bytes = n * es + k * 8 + (g + 1) * 8 + g * c * es + im.numel() * es

        def launch(cfg: Config, out: torch.Tensor):
            kernels._lift_fwd_kernel[(g, -(-c // cfg.block_c))](
                dep, im, plan.order, plan.cell_ptr, plan.launch_cells, out, c, d_bins * fh * fw, fh * fw,
                IS_F64=False, **cfg.meta())
    inputs = (feats,) if kernel == "pool" else (dep, im)
    return Case(kernel, dname, launch, out, ref, ref_abs, floor_bytes, inputs)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--small", action="store_true", help="tiny problem (for the CPU interpreter)")
    ap.add_argument("--dtypes", default="fp32,fp16", help=f"comma list of {sorted(DTYPES)}")
    ap.add_argument("--kernels", default="pool,lift", help="comma list of pool, lift")
    ap.add_argument("--configs", default=None, help="BLOCK_PxNUM_WARPSxBLOCK_C,... (default: the full sweep)")
    ap.add_argument("--repeat", type=int, default=None, help="timing samples (default 20 on CUDA, 2 on CPU)")
    ap.add_argument("--inner", type=int, default=None, help="back-to-back calls per CUDA sample (default 5)")
    ap.add_argument("--traceback", action="store_true", help="print the traceback of a failed config")
    ap.add_argument("--json", default=None, metavar="PATH", help="write the rows here (shared benchmark format)")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    dtypes, kinds = args.dtypes.split(","), args.kernels.split(",")
    if [d for d in dtypes if d not in DTYPES] or [k for k in kinds if k not in KERNELS]:
        ap.error(f"--dtypes from {sorted(DTYPES)}, --kernels from {list(KERNELS)}; got {dtypes}, {kinds}")
    try:
        configs = parse_configs(args.configs) if args.configs else sweep_configs()
    except ValueError as e:
        ap.error(str(e))
    if not cuda:
        if os.environ.get("TRITON_INTERPRET", "1") in ("", "0"):
            ap.error("--device cpu runs the kernels in Triton's interpreter: unset TRITON_INTERPRET=0")
        os.environ["TRITON_INTERPRET"] = "1"  # read when the kernels are decorated (imported below)
    elif not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device")
    elif os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        ap.error("--device cuda with TRITON_INTERPRET set would time the interpreter: unset it")
    elif device.index is not None:
        torch.cuda.set_device(device)
    repeat = args.repeat or (20 if cuda else 2)
    inner = args.inner or 5

    import bench_bev_pool

    from bevfusion.ops.bev_pool import bev_pool_plan
    from bevfusion.ops.bev_pool import triton as kernels

    t_start = time.perf_counter()
    dev_name = device_name(device)
    report = JsonReport(args.json, "bev_pool_tune", dev_name)
    if args.small:
        coords, grid, depth, img = tiny_problem(device)
    else:
        coords, grid, depth, img = bench_bev_pool.make_problem(False, device)
    plan = bev_pool_plan(coords, 1, grid)
    c = img.shape[-1]
    lengths = plan.interval_lengths.float()
    print(f"# tune_bev_pool  {datetime.date.today()}  device: {dev_name}  torch {torch.__version__}")
    print(f"N = {plan.num_points:,} points (kept {plan.num_kept:,}), C = {c}, grid (D, H, W) = {tuple(grid)}, "
          f"{plan.num_intervals:,} non-empty cells of {plan.num_cells:,}; interval length mean "
          f"{lengths.mean():.1f}, max {int(lengths.max())}; {len(configs)} configs")
    bw = bw_sheet = None
    if cuda:
        bw = copy_bandwidth(device)
        bw_sheet = datasheet_bandwidth(dev_name)
        print(f"copy bandwidth {bw / 1e9:.0f} GB/s (read + write)"
              + (f"; datasheet {bw_sheet / 1e12:.2f} TB/s" if bw_sheet else "; no datasheet bandwidth known"))

    best = []  # (kernel, dtype, floor bytes, default Row or None, best Row, best Config)
    dead = None  # set when a CUDA error has poisoned the context
    for dname in dtypes:
        for kind in kinds:
            title = f"{KERNEL_NAMES[kind]}, {dname}"
            if dead:
                report.skip(title, f"not run: {dead}")
                continue
            try:
                case = build_cases(kind, dname, plan, depth, img, kernels)
            except Exception as e:  # noqa: BLE001 - recorded, the other tables still run
                report.skip(title, f"inputs or reference failed: {one_line(e)}")
                if cuda and ("CUDA error" in str(e) or "illegal" in str(e).lower()):
                    dead = f"CUDA error building {title}: {one_line(e)}"
                continue
            d = kernels._fwd_meta(c, DTYPES[dname], kernel=kind)
            default = Config(d["BLOCK_P"], d["num_warps"], d["BLOCK_C"])
            rtol, atol = TOL[dname]
            ok = {}
            for cfg in [default] + [x for x in configs if x != default]:
                label = cfg.label
                tag = (f"BLOCK_P={cfg.block_p} num_warps={cfg.num_warps} BLOCK_C={cfg.block_c}"
                       + (" (default)" if cfg == default else ""))
                if dead:
                    report.skip(f"{title}: {label}", f"not run: {dead}")
                    continue
                single = None
                try:
                    case.out.fill_(float("nan"))
                    t0 = time.perf_counter()
                    case.launch(cfg, case.out)
                    if cuda:
                        torch.cuda.synchronize()
                    first_s = time.perf_counter() - t0
                    rel, problem = check_output(case.out, case.ref, case.ref_abs, rtol, atol)
                    if problem:
                        raise WrongResult(problem)
                    fn = lambda: case.launch(cfg, case.out)  # noqa: E731
                    if cuda:
                        ms = gpu_ms(fn, repeat, inner)
                        single = time_fn(fn, device, warmup=0, repeat=max(5, repeat // 3))
                    else:
                        ms = time_fn(fn, device, warmup=0, repeat=repeat)
                except Exception as e:  # noqa: BLE001 - recorded, the sweep goes on
                    if args.traceback and not isinstance(e, WrongResult):
                        traceback.print_exc()
                    why = one_line(e)
                    if cuda and ("CUDA error" in str(e) or "illegal" in str(e).lower()):
                        dead = f"CUDA error in {title}: {label}: {why}"
                    report.skip(f"{title}: {label}", why if isinstance(e, WrongResult) else f"failed: {why}")
                    continue
                note = tag + (f"; single call {single:.3f} ms" if single is not None else "") + \
                    f"; first call {first_s:.2f} s"
                ok[label] = (Row(label, ms, note, relerr=rel), cfg, single, first_s)
            base = ok.get(default.label, (None,))[0]
            how = f"median of {repeat} samples of {inner} back-to-back calls" if cuda else "median"
            print(f"\n## {title}: ms per call ({how}), x = speed-up vs the default {default.label} (*)")
            print("| config | ms | x vs default | single call ms | relerr | first call s |")
            print("|---|---|---|---|---|---|")
            records = []
            for row, cfg, single, first_s in ok.values():
                x = speedup(base.ms, row.ms) if base is not None and cfg != default else None
                print(f"| {row.name}{' *' if cfg == default else ''} | {row.ms:.4f} | "
                      f"{f'{x:.2f}' if x is not None else '-'} | {f'{single:.4f}' if single is not None else '-'} | "
                      f"{row.relerr:.1e} | {first_s:.2f} |", flush=True)
                records.append(Record(table=title, what=row.name, dtype=dname, ms=row.ms, ratio=x,
                                      ratio_vs=default.label if x is not None else None, relerr=row.relerr,
                                      note=row.note))
            report.add(*records)
            if ok:
                label = min(ok, key=lambda x: ok[x][0].ms)
                best.append((kind, dname, case.floor_bytes, base, *ok[label][:2]))
            else:
                report.skip(f"best config, {title}", "no config ran")
            del case

    # best config per (kernel, dtype), against the default and the memory floor
    rows, records = [], []
    for kind, dname, floor_bytes, base, row, cfg in best:
        floor_ms = floor_bytes / (bw_sheet or bw) * 1e3 if cuda else None
        x_def = speedup(base.ms, row.ms) if base is not None else None
        what = f"{KERNEL_NAMES[kind]} {dname}: {row.name}"
        note = (f"BLOCK_P={cfg.block_p} num_warps={cfg.num_warps} BLOCK_C={cfg.block_c}; "
                + (f"{x_def:.2f}x the default's speed ({base.name}, {base.ms:.3f} ms)" if x_def else
                   "default not timed"))
        if floor_ms is not None:
            note += (f"; {row.ms / floor_ms:.2f}x the floor's time ({floor_ms:.4f} ms = "
                     f"{floor_bytes / 1e6:.0f} MB at {(bw_sheet or bw) / 1e12:.2f} TB/s "
                     f"{'datasheet' if bw_sheet else 'measured'}; measured copy bandwidth: "
                     f"{floor_bytes / bw * 1e3:.4f} ms)")
        rows.append(Row(what, row.ms, note, relerr=row.relerr))
        records.append(Record(table="best config per kernel and dtype", what=what, dtype=dname, ms=row.ms,
                              ratio=speedup(floor_ms, row.ms), ratio_vs="floor" if floor_ms else None,
                              relerr=row.relerr, note=note))
    print_table("best config per kernel and dtype", rows)
    report.add(*records)
    print(f"\ntotal {time.perf_counter() - t_start:.1f} s; skipped configs: {len(report.skipped)}")
    return 0 if len(best) == len(dtypes) * len(kinds) and not dead else 1


if __name__ == "__main__":
    sys.exit(main())
