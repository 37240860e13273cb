"""Box ops: NMS, the rotated IoU matrix, circle NMS and points-in-boxes, ours vs naive / peer versions
in one run.

usage: python benchmarks/bench_boxes.py [--device cpu|cuda] [--repeat N] [--skip-naive] [--small] [--quick]
                                       [--json PATH]

Scene: 200 objects in ±54 m (sizes 0.5-12 m, random yaw), each with 5 jittered proposals (±0.3 m,
±0.1 rad, ±10 % size) → 1,000 scored boxes, as a detector's pre-NMS output (CenterHead: pre_max 1000,
post_max 83, nms_thr 0.2). Points: 300k in ±54 m (z in [-3, 3]) against the 200 object boxes.
`--small`: 20 objects (100 boxes) and 30k points; `--quick`: few repeats; `--json PATH`: the rows in the
shared benchmark format (benchmarks/common.py). shapely is optional: without it its rows are skipped
with the reason.

Rows (NMS, threshold 0.2, pre_max 1000, post_max 83):
  naive loop           `impl="reference"`: Python greedy loop with Python polygon clipping
  shapely loop         greedy loop with shapely polygons (intersection / union areas): a common peer
  ours                 `nms_bev(impl="auto")`: numba greedy pass with lazy IoU on CPU; Triton IoU
                       matrix + host greedy over the mask on CUDA
  ours (matrix+mask)   the full IoU matrix, `> thr`, greedy over the mask (the GPU strategy)
IoU matrix (1000 x 1000): ours vs the Python reference and shapely on a 20 x 1000 slice (time x 50).
Circle NMS (1000 centres, 4 m^2): ours vs the Python loop of mmdet3d's circle_nms.
Points-in-boxes (300k x 200): ours vs the float64 broadcast torch reference (on a 30k slice, time x 10).
Every row's result is checked against ours (a mismatch is noted in the row and the run exits 1). The
Python loops are timed by the single call that gives the check. On CUDA the rows of ours also give the
peak memory of one call.
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

from bevfusion.ops.boxes import circle_nms, nms_bev, points_in_boxes, rotated_iou_bev  # noqa: E402
from bevfusion.ops.boxes import cpu as boxes_cpu  # noqa: E402
from bevfusion.ops.boxes.reference import (descending_order, points_in_boxes_reference,  # noqa: E402
                                           rotated_iou_bev_reference)


def make_scene(objects: int = 200, proposals: int = 5, points: int = 300_000, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    obj = torch.zeros(objects, 7)
    obj[:, :2] = (torch.rand(objects, 2, generator=gen) * 2 - 1) * 54
    obj[:, 2] = torch.randn(objects, generator=gen) * 0.5
    obj[:, 3] = torch.rand(objects, generator=gen) * 11.5 + 0.5
    obj[:, 4] = obj[:, 3] * (torch.rand(objects, generator=gen) * 0.5 + 0.3)
    obj[:, 5] = torch.rand(objects, generator=gen) * 2 + 1
    obj[:, 6] = (torch.rand(objects, generator=gen) * 2 - 1) * math.pi
    boxes = obj.repeat_interleave(proposals, 0)
    n = len(boxes)
    boxes[:, :2] += (torch.rand(n, 2, generator=gen) * 2 - 1) * 0.3
    boxes[:, 3:6] *= 1 + (torch.rand(n, 3, generator=gen) * 2 - 1) * 0.1
    boxes[:, 6] += (torch.rand(n, generator=gen) * 2 - 1) * 0.1
    scores = torch.rand(n, generator=gen)
    pts = torch.cat([(torch.rand(points, 2, generator=gen) * 2 - 1) * 54,
                     torch.rand(points, 1, generator=gen) * 6 - 3], 1)
    return boxes, scores, obj, pts


def shapely_polygons(boxes):
    from shapely import affinity
    from shapely.geometry import box as sbox

    return [affinity.translate(affinity.rotate(sbox(-r[3] / 2, -r[4] / 2, r[3] / 2, r[4] / 2), r[6], origin=(0, 0),
                                               use_radians=True), r[0], r[1]) for r in boxes.double().tolist()]


def shapely_matrix(a, c):
    pa, pc = shapely_polygons(a), shapely_polygons(c)
    return [[x.intersection(y).area / max(x.union(y).area, 1e-12) for y in pc] for x in pa]


def shapely_nms(boxes, scores, thr, pre_max, post_max):
    polys = shapely_polygons(boxes)
    keep = []
    for i in descending_order(scores).tolist()[:pre_max]:
        ok = True
        for k in keep:
            inter = polys[k].intersection(polys[i]).area
            union = polys[k].area + polys[i].area - inter
            if union > 0 and inter / union > thr:
                ok = False
                break
        if ok:
            keep.append(i)
            if len(keep) == post_max:
                break
    return keep


def naive_circle_nms(xy, scores, thr, post_max):
    """mmdet3d's circle_nms as a plain Python loop (its numba version without the JIT)."""
    xy = xy.tolist()
    order = descending_order(scores).tolist()
    suppressed = [False] * len(order)
    keep = []
    for n, i in enumerate(order):
        if suppressed[i]:
            continue
        keep.append(i)
        for j in order[n + 1:]:
            if not suppressed[j] and (xy[i][0] - xy[j][0]) ** 2 + (xy[i][1] - xy[j][1]) ** 2 <= thr:
                suppressed[j] = True
    return keep[:post_max]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeat", type=int, default=None)
    ap.add_argument("--skip-naive", action="store_true", help="skip the Python-loop rows (seconds per call)")
    ap.add_argument("--small", action="store_true", help="20 objects (100 boxes) and 30k points")
    ap.add_argument("--quick", action="store_true", help="few repeats")
    ap.add_argument("--json", default=None, metavar="PATH", help="write the rows here (shared benchmark format)")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    repeat = args.repeat or ((10 if args.quick else 20) if cuda else (2 if args.quick else 5))
    boxes, scores, obj, pts = make_scene(20, 5, 30_000) if args.small else make_scene()
    b, s, o, p = boxes.to(device), scores.to(device), obj.to(device), pts.to(device)
    dev_name = device_name(device)
    report = JsonReport(args.json, "boxes", dev_name)
    failed = []
    print(f"# bench_boxes  {datetime.date.today()}  device: {dev_name}  torch {torch.__version__}")
    try:
        import shapely

        no_shapely = None
        print(f"shapely {shapely.__version__}")
    except Exception as e:  # noqa: BLE001 - optional peer
        no_shapely = f"shapely not importable ({one_line(e)})"
    thr, pre_max, post_max = 0.2, 1000, 83
    nb, npts = len(boxes), len(pts)

    def once(rows, label, fn, expect, note="CPU, 1 call"):
        """A slow Python peer: one call is both its check against ours and its timing."""
        try:
            t0 = time.perf_counter()
            out = fn()
            ms = (time.perf_counter() - t0) * 1e3
            if expect is not None and out != expect:
                failed.append(label)
                note += "; RESULT DIFFERS FROM OURS"
            rows.append(Row(label, ms, note))
        except Exception as e:  # noqa: BLE001 - recorded, the other rows still run
            traceback.print_exc()
            failed.append(label)
            report.skip(label, f"failed: {one_line(e)}")

    def timed(rows, label, fn, check=None, scale=1.0, note=""):
        """Ours (or a vectorised peer) on the device: first call = warm-up, peak memory and check."""
        try:
            out, peak = cuda_peak_mib(fn, device)
            if check is not None:
                ok, cnote = check(out)
                note = "; ".join(x for x in (note, cnote) if x)
                if not ok:
                    failed.append(label)
            del out
            rows.append(Row(label, scale * time_fn(fn, device, warmup=1, repeat=repeat), note, peak_mib=peak))
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            failed.append(label)
            report.skip(label, f"failed: {one_line(e)}")

    def skip_naive(label):
        report.skip(label, "--skip-naive")

    # --- NMS
    title = f"rotated NMS, {nb} boxes, thr {thr}"
    rows = []
    try:
        ours = nms_bev(b, s, thr, pre_max, post_max).cpu().tolist()
    except Exception as e:  # noqa: BLE001
        traceback.print_exc()
        failed.append(title)
        report.skip(title, f"ours failed: {one_line(e)}")
        ours = None
    if ours is not None:
        print(f"\nNMS: {nb} boxes -> {len(ours)} kept (post_max {post_max})")
        if args.skip_naive:
            skip_naive("naive loop (impl=reference)")
        else:
            once(rows, "naive loop (impl=reference)",
                 lambda: nms_bev(boxes, scores, thr, pre_max, post_max, impl="reference").tolist(), ours)
        if no_shapely:
            report.skip("shapely loop (NMS)", no_shapely)
        else:
            once(rows, "shapely loop", lambda: shapely_nms(boxes, scores, thr, pre_max, post_max), ours)

        def same(out):
            ok = out.cpu().tolist() == ours
            return ok, "" if ok else "RESULT DIFFERS"

        timed(rows, "ours (impl=auto)", lambda: nms_bev(b, s, thr, pre_max, post_max), same)

        def matrix_mask():
            order = descending_order(s)[:pre_max]
            cand = b[order]
            over = rotated_iou_bev(cand, cand) > thr
            return order[boxes_cpu.greedy_from_mask(over, post_max).to(order.device)]

        timed(rows, "ours (matrix + mask)", matrix_mask, same)
        report.table(title, rows, "fp32", baseline="shapely loop" if not no_shapely else "naive loop (impl=reference)")

    # --- IoU matrix: the slow peers on a 20-row slice, their time scaled to the whole matrix
    k = min(20, nb)
    scale = nb / k
    title = f"rotated IoU matrix {nb} x {nb}"
    rows = []
    try:
        ours_m = rotated_iou_bev(b, b).cpu().double()
    except Exception as e:  # noqa: BLE001
        traceback.print_exc()
        failed.append(title)
        report.skip(title, f"ours failed: {one_line(e)}")
        ours_m = None
    if ours_m is not None:
        def close(ref):
            err = float((ours_m[:k] - torch.as_tensor(ref, dtype=torch.float64)).abs().max())
            return err < 1e-4, f"max |ours - it| {err:.1e}"

        for label, fn, missing in (
                (f"python reference ({k} x {nb} slice) x {scale:g}",
                 lambda: rotated_iou_bev_reference(boxes[:k], boxes), "--skip-naive" if args.skip_naive else None),
                (f"shapely ({k} x {nb} slice) x {scale:g}", lambda: shapely_matrix(boxes[:k], boxes), no_shapely)):
            if missing:
                report.skip(label, missing)
                continue
            try:
                t0 = time.perf_counter()
                ref = fn()
                ms = (time.perf_counter() - t0) * 1e3 * scale
                ok, note = close(ref)
                if not ok:
                    failed.append(label)
                    note += " (RESULT DIFFERS)"
                rows.append(Row(label, ms, f"CPU, 1 call; {note}"))
            except Exception as e:  # noqa: BLE001
                traceback.print_exc()
                failed.append(label)
                report.skip(label, f"failed: {one_line(e)}")
        timed(rows, "ours (impl=auto)", lambda: rotated_iou_bev(b, b))
        report.table(title, rows, "fp32", baseline=rows[0].name if len(rows) > 1 else None)

    # --- circle NMS
    title = f"circle NMS, {nb} centres, 4 m^2"
    rows = []
    try:
        ours_c = circle_nms(b, s, 4.0, post_max=post_max).cpu().tolist()
    except Exception as e:  # noqa: BLE001
        traceback.print_exc()
        failed.append(title)
        report.skip(title, f"ours failed: {one_line(e)}")
        ours_c = None
    if ours_c is not None:
        naive = "python loop (mmdet3d circle_nms without numba)"
        if args.skip_naive:
            skip_naive(naive)
        else:
            once(rows, naive, lambda: naive_circle_nms(boxes[:, :2].double(), scores, 4.0, post_max), ours_c)
        timed(rows, "ours (impl=auto)", lambda: circle_nms(b, s, 4.0, post_max=post_max),
              lambda out: (out.cpu().tolist() == ours_c, ""))
        report.table(title, rows, "fp32", baseline=naive if not args.skip_naive else None)

    # --- points in boxes: the float64 broadcast reference on a slice, its time scaled
    title = f"points in boxes, {npts:,} points x {len(obj)} boxes"
    rows = []
    sl = min(30_000, npts)
    ref_label = f"torch float64 broadcast ({sl:,} slice) x {npts / sl:g}"
    try:
        ref_p = torch.cat([points_in_boxes_reference(chunk, o).cpu() for chunk in p.split(30_000)])

        def vs_ref(out):
            mismatch = int((out.cpu() != ref_p).sum())
            return True, f"{mismatch} of {ref_p.numel():,} differ from float64"  # float32 edge cases may differ

        p_slice = p[:sl]
        timed(rows, ref_label, lambda: points_in_boxes_reference(p_slice, o), scale=npts / sl)
        timed(rows, "ours (impl=auto)", lambda: points_in_boxes(p, o), vs_ref)
    except Exception as e:  # noqa: BLE001
        traceback.print_exc()
        failed.append(title)
        report.skip(title, f"reference failed: {one_line(e)}")
    report.table(title, rows, "fp32", baseline=ref_label)
    if failed:
        print(f"rows that failed or differ: {failed}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
