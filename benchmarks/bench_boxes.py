"""Box ops: NMS, the rotated IoU matrix, circle NMS and points-in-boxes, ours vs naive / peer versions
in one run.

usage: python benchmarks/bench_boxes.py [--device cpu|cuda] [--repeat N] [--skip-naive]

Scene: 200 objects in ±54 m (sizes 0.5-12 m, random yaw), each with 5 jittered proposals (±0.3 m,
±0.1 rad, ±10 % size) → 1,000 scored boxes, as a detector's pre-NMS output (CenterHead: pre_max 1000,
post_max 83, nms_thr 0.2). Points: 300k in ±54 m (z in [-3, 3]) against the 200 object boxes.

Rows (NMS, threshold 0.2, pre_max 1000, post_max 83):
  naive loop           `impl="reference"`: Python greedy loop with Python polygon clipping
  shapely loop         greedy loop with shapely polygons (intersection / union areas): a common peer
  ours                 `nms_bev(impl="auto")`: numba greedy pass with lazy IoU on CPU; Triton IoU
                       matrix + host greedy over the mask on CUDA
  ours (matrix+mask)   the full IoU matrix, `> thr`, greedy over the mask (the GPU strategy)
IoU matrix (1000 x 1000): ours vs shapely on a 20 x 1000 slice (time x 50).
Circle NMS (1000 centres, 4 m^2): ours vs the Python loop of mmdet3d's circle_nms.
Points-in-boxes (300k x 200): ours vs the float64 broadcast torch reference (on a 30k slice, time x 10).
Every row's result is checked against ours.
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

from bevfusion.ops.boxes import circle_nms, nms_bev, points_in_boxes, rotated_iou_bev  # noqa: E402
from bevfusion.ops.boxes import cpu as boxes_cpu  # noqa: E402
from bevfusion.ops.boxes.reference import descending_order, points_in_boxes_reference  # noqa: E402


def make_scene(objects: int = 200, proposals: int = 5, seed: int = 0):
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
    pts = torch.cat([(torch.rand(300_000, 2, generator=gen) * 2 - 1) * 54,
                     torch.rand(300_000, 1, generator=gen) * 6 - 3], 1)
    return boxes, scores, obj, pts


def shapely_nms(boxes, scores, thr, pre_max, post_max):
    from shapely import affinity
    from shapely.geometry import box as sbox

    polys = []
    for x, y, _, dx, dy, _, yaw in boxes.double().tolist():
        polys.append(affinity.translate(affinity.rotate(sbox(-dx / 2, -dy / 2, dx / 2, dy / 2), yaw, origin=(0, 0),
                                                        use_radians=True), x, y))
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeat", type=int, default=None)
    ap.add_argument("--skip-naive", action="store_true", help="skip the Python-loop rows (seconds per call)")
    args = ap.parse_args()
    device = torch.device(args.device)
    repeat = args.repeat or (20 if device.type == "cuda" else 5)
    boxes, scores, obj, pts = make_scene()
    b, s, o, p = boxes.to(device), scores.to(device), obj.to(device), pts.to(device)
    print(f"# bench_boxes  {datetime.date.today()}  device: {device_name(device)}  torch {torch.__version__}")
    thr, pre_max, post_max = 0.2, 1000, 83

    # --- NMS
    ours = nms_bev(b, s, thr, pre_max, post_max).cpu()
    print(f"\nNMS: {len(boxes)} boxes → {len(ours)} kept (post_max {post_max})")
    rows = []
    if not args.skip_naive:
        assert nms_bev(boxes, scores, thr, pre_max, post_max, impl="reference").tolist() == ours.tolist()
        rows.append(Row("naive loop (impl=reference)", time_fn(
            lambda: nms_bev(boxes, scores, thr, pre_max, post_max, impl="reference"), "cpu", warmup=0, repeat=1),
            "CPU"))
    assert shapely_nms(boxes, scores, thr, pre_max, post_max) == ours.tolist()
    rows.append(Row("shapely loop", time_fn(lambda: shapely_nms(boxes, scores, thr, pre_max, post_max), "cpu",
                                            warmup=0, repeat=1), "CPU"))
    rows.append(Row("ours (impl=auto)", time_fn(lambda: nms_bev(b, s, thr, pre_max, post_max), device,
                                                repeat=repeat)))

    def matrix_mask():
        order = descending_order(s)[:pre_max]
        cand = b[order]
        over = rotated_iou_bev(cand, cand) > thr
        return order[boxes_cpu.greedy_from_mask(over, post_max).to(order.device)]

    assert matrix_mask().cpu().tolist() == ours.tolist()
    rows.append(Row("ours (matrix + mask)", time_fn(matrix_mask, device, repeat=repeat)))
    print_table(f"rotated NMS, {len(boxes)} boxes, thr {thr}", rows, baseline="shapely loop")

    # --- IoU matrix
    from shapely import affinity
    from shapely.geometry import box as sbox

    def shapely_matrix(a, c):
        pa = [affinity.translate(affinity.rotate(sbox(-r[3] / 2, -r[4] / 2, r[3] / 2, r[4] / 2), r[6], origin=(0, 0),
                                                 use_radians=True), r[0], r[1]) for r in a.double().tolist()]
        pc = [affinity.translate(affinity.rotate(sbox(-r[3] / 2, -r[4] / 2, r[3] / 2, r[4] / 2), r[6], origin=(0, 0),
                                                 use_radians=True), r[0], r[1]) for r in c.double().tolist()]
        return [[x.intersection(y).area / max(x.union(y).area, 1e-12) for y in pc] for x in pa]

    ours_m = rotated_iou_bev(b, b).cpu()
    sm = torch.tensor(shapely_matrix(boxes[:20], boxes))
    err = float((ours_m[:20].double() - sm.double()).abs().max())
    rows = [Row("shapely (20 x 1000 slice) x 50", 50 * time_fn(lambda: shapely_matrix(boxes[:20], boxes), "cpu",
                                                                warmup=0, repeat=1), "CPU"),
            Row("ours (impl=auto)", time_fn(lambda: rotated_iou_bev(b, b), device, repeat=repeat),
                f"max |ours - shapely| {err:.1e}")]
    print_table("rotated IoU matrix 1000 x 1000", rows, baseline="shapely (20 x 1000 slice) x 50")

    # --- circle NMS
    ours_c = circle_nms(b, s, 4.0, post_max=post_max).cpu()
    assert naive_circle_nms(boxes[:, :2].double(), scores, 4.0, post_max) == ours_c.tolist()
    rows = [Row("python loop (mmdet3d circle_nms without numba)", time_fn(
        lambda: naive_circle_nms(boxes[:, :2], scores, 4.0, post_max), "cpu", warmup=0, repeat=1), "CPU"),
        Row("ours (impl=auto)", time_fn(lambda: circle_nms(b, s, 4.0, post_max=post_max), device, repeat=repeat))]
    print_table("circle NMS, 1000 centres, 4 m^2", rows, baseline="python loop (mmdet3d circle_nms without numba)")

    # --- points in boxes
    ours_p = points_in_boxes(p, o).cpu()
    ref_p = torch.cat([points_in_boxes_reference(chunk, obj) for chunk in pts.split(30_000)])
    mismatch = int((ours_p != ref_p).sum())
    p_slice = p[:30_000]
    rows = [Row("torch float64 broadcast (30k slice) x 10", 10 * time_fn(lambda: points_in_boxes_reference(p_slice, o),
                                                                         device, warmup=0, repeat=1)),
            Row("ours (impl=auto)", time_fn(lambda: points_in_boxes(p, o), device, repeat=repeat),
                f"{mismatch} of {ref_p.numel():,} differ from float64")]
    print_table("points in boxes, 300k points x 200 boxes", rows, baseline="torch float64 broadcast (30k slice) x 10")


if __name__ == "__main__":
    main()
