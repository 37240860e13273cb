"""Slow, obvious box ops: Python loops and general convex-polygon clipping in float64. The oracle for
the fast paths (and itself checked against shapely in the tests).

Boxes are (x, y, z, dx, dy, dz, yaw, ...) in the internal LiDAR-frame convention (see the package
docstring); BEV ops read columns x, y, dx, dy, yaw.
"""
from __future__ import annotations

import math

import torch

# corner signs (along heading, across heading): counter-clockwise seen from above, front-left first
_SIGNS = ((1.0, 1.0), (-1.0, 1.0), (-1.0, -1.0), (1.0, -1.0))


SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)  # of the boxes and points


def box_corners_bev(boxes: torch.Tensor) -> torch.Tensor:
    """(..., 7+) boxes → (..., 4, 2) BEV corners, counter-clockwise from the front-left corner
    (+dx/2, +dy/2). Differentiable; any device and float dtype."""
    signs = torch.tensor(_SIGNS, dtype=boxes.dtype, device=boxes.device)  # (4, 2)
    local = signs * boxes[..., None, 3:5] / 2  # (..., 4, 2)
    c, s = torch.cos(boxes[..., 6:7]), torch.sin(boxes[..., 6:7])  # (..., 1)
    x = local[..., 0] * c - local[..., 1] * s
    y = local[..., 0] * s + local[..., 1] * c
    return torch.stack([x, y], dim=-1) + boxes[..., None, 0:2]


def box_corners_3d(boxes: torch.Tensor) -> torch.Tensor:
    """(..., 7+) boxes → (..., 8, 3) corners: the bottom face (z - dz/2) in `box_corners_bev` order, then
    the top face (z + dz/2) in the same order (as `bevfusion.structures.boxes.box_corners`)."""
    bev = box_corners_bev(boxes)  # (..., 4, 2)
    half = boxes[..., None, 5:6] / 2
    z = boxes[..., None, 2:3]
    bottom = torch.cat([bev, (z - half).expand(*bev.shape[:-1], 1)], dim=-1)
    top = torch.cat([bev, (z + half).expand(*bev.shape[:-1], 1)], dim=-1)
    return torch.cat([bottom, top], dim=-2)


def _corners_py(box) -> list[tuple[float, float]]:
    x, y, dx, dy, yaw = box[0], box[1], box[3], box[4], box[6]
    c, s = math.cos(yaw), math.sin(yaw)
    return [(x + sx * dx / 2 * c - sy * dy / 2 * s, y + sx * dx / 2 * s + sy * dy / 2 * c) for sx, sy in _SIGNS]


def clip_convex(subject: list, clip: list) -> list:
    """Sutherland–Hodgman: the part of polygon `subject` inside the counter-clockwise convex `clip`."""
    out = subject
    for k in range(len(clip)):
        (ax, ay), (bx, by) = clip[k], clip[(k + 1) % len(clip)]
        inp, out = out, []
        if not inp:
            break
        for i in range(len(inp)):
            p, q = inp[i], inp[(i + 1) % len(inp)]
            dp = (bx - ax) * (p[1] - ay) - (by - ay) * (p[0] - ax)  # >= 0: left of the edge = inside
            dq = (bx - ax) * (q[1] - ay) - (by - ay) * (q[0] - ax)
            if dp >= 0:
                out.append(p)
            if (dp >= 0) != (dq >= 0):
                t = dp / (dp - dq)
                out.append((p[0] + t * (q[0] - p[0]), p[1] + t * (q[1] - p[1])))
    return out


def polygon_area(poly: list) -> float:
    return abs(sum(p[0] * q[1] - q[0] * p[1] for p, q in zip(poly, poly[1:] + poly[:1]))) / 2 if poly else 0.0


def inter_pair(a, b) -> float:
    """BEV intersection area of two boxes given as sequences of floats."""
    return polygon_area(clip_convex(_corners_py(a), _corners_py(b)))


def iou_pair(a, b, min_union: float = 0.0) -> float:
    """BEV IoU of two boxes given as sequences of floats: inter / max(union, min_union), 0 if that is <= 0."""
    area_a, area_b = a[3] * a[4], b[3] * b[4]
    inter = inter_pair(a, b)
    union = max(area_a + area_b - inter, min_union)
    return min(max(inter / union, 0.0), 1.0) if union > 0 else 0.0


def _pairwise(fn, a: torch.Tensor, b: torch.Tensor, aligned: bool) -> torch.Tensor:
    la, lb = a.detach().double().tolist(), b.detach().double().tolist()
    if aligned:
        out = [fn(p, q) for p, q in zip(la, lb)]
        return torch.tensor(out, dtype=torch.float64).reshape(len(la)).to(a.dtype).to(a.device)
    out = [[fn(p, q) for q in lb] for p in la]
    return torch.tensor(out, dtype=torch.float64).reshape(len(la), len(lb)).to(a.dtype).to(a.device)


def rotated_iou_bev_reference(a: torch.Tensor, b: torch.Tensor, aligned: bool = False,
                              min_union: float = 0.0) -> torch.Tensor:
    """(M, 7+), (K, 7+) → (M, K) IoU (or (M,) with aligned=True), float64 loops, in a's dtype."""
    return _pairwise(lambda p, q: iou_pair(p, q, min_union), a, b, aligned)


def rotated_intersection_bev_reference(a: torch.Tensor, b: torch.Tensor, aligned: bool = False) -> torch.Tensor:
    """(M, 7+), (K, 7+) → (M, K) BEV intersection areas (or (M,) with aligned=True), float64 loops, in a's
    dtype."""
    return _pairwise(inter_pair, a, b, aligned)


def points_in_boxes_reference(points: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """(P, 3+), (M, 7+) → (P, M) bool: |local x| <= dx/2, |local y| <= dy/2, |z - zc| <= dz/2 (faces
    inclusive), in float64."""
    p = points[:, None, :3].double()
    b = boxes[None].double()
    d = p - b[..., :3]  # (P, M, 3)
    c, s = torch.cos(b[..., 6]), torch.sin(b[..., 6])
    lx = d[..., 0] * c + d[..., 1] * s
    ly = -d[..., 0] * s + d[..., 1] * c
    return (lx.abs() <= b[..., 3] / 2) & (ly.abs() <= b[..., 4] / 2) & (d[..., 2].abs() <= b[..., 5] / 2)


def descending_order(scores: torch.Tensor) -> torch.Tensor:
    """Indices by decreasing score; ties keep the lower index first (a stable sort)."""
    return torch.sort(scores, descending=True, stable=True).indices


def nms_bev_reference(boxes, scores, iou_threshold: float, pre_max=None, post_max=None,
                      min_union: float = 0.0) -> torch.Tensor:
    order = descending_order(scores).tolist()[:pre_max]
    rows = boxes.detach().double().tolist()
    keep: list[int] = []
    for i in order:
        if all(iou_pair(rows[k], rows[i], min_union) <= iou_threshold for k in keep):
            keep.append(i)
    return torch.tensor(keep[:post_max], dtype=torch.int64, device=boxes.device)


def circle_nms_reference(centers, scores, dist_threshold: float, post_max=None) -> torch.Tensor:
    order = descending_order(scores).tolist()
    xy = centers.detach()[:, :2]
    xy = xy.double() if xy.dtype == torch.float64 else xy.float()
    keep: list[int] = []
    for i in order:
        # squared distance in the centres' float32 (float64) arithmetic, compared with the threshold in float64
        d2 = [float(((xy[k] - xy[i]) ** 2).sum()) for k in keep]
        if all(d > dist_threshold for d in d2):
            keep.append(i)
    return torch.tensor(keep[:post_max], dtype=torch.int64, device=centers.device)
