"""CPU fast paths for the box ops: numba kernels in float64.

Rotated BEV IoU clips box b, expressed in box a's frame (a becomes the axis-aligned rectangle
[-dx/2, dx/2] x [-dy/2, dy/2]), against a's four sides (Sutherland–Hodgman), then takes the shoelace
area. Working in a's frame keeps identical, aligned and 90°-rotated boxes exact or within a few ulps,
and each clip step only interpolates along an edge, so near-degenerate (touching, collinear) pairs
give slivers of rounding size, never a wrong polygon. Pairs whose circumscribed circles are apart are
skipped (their intersection area is zero too: the same kernels return it with `area=True`). NMS evaluates
IoUs lazily during the greedy pass (only kept box x remaining candidate).

numba is imported with this module (which `bevfusion.ops.boxes` imports only when a CPU path
runs); the kernels are compiled on first call and cached on disk.
"""
from __future__ import annotations

import numpy as np
import torch

from .._numba import jit as _jit


@_jit
def _nb_inter_area(a, b, bx, by, cx, cy):
    """Intersection area of rows a, b = (x, y, dx, dy, yaw); bx..cy are scratch buffers (>= 16)."""
    hx, hy = a[2] * 0.5, a[3] * 0.5
    ca, sa = np.cos(a[4]), np.sin(a[4])
    dx, dy = b[0] - a[0], b[1] - a[1]
    ox, oy = dx * ca + dy * sa, -dx * sa + dy * ca
    r = b[4] - a[4]
    cr, sr = np.cos(r), np.sin(r)
    hbx, hby = b[2] * 0.5, b[3] * 0.5
    for k in range(4):
        sx = 1.0 if k == 0 or k == 3 else -1.0
        sy = 1.0 if k < 2 else -1.0
        bx[k] = ox + sx * hbx * cr - sy * hby * sr
        by[k] = oy + sx * hbx * sr + sy * hby * cr
    n = 4
    src_x, src_y, dst_x, dst_y = bx, by, cx, cy
    for side in range(4):
        # inside: nx * x + ny * y <= h for the sides x <= hx, -x <= hx, y <= hy, -y <= hy
        nx = 1.0 if side == 0 else (-1.0 if side == 1 else 0.0)
        ny = 1.0 if side == 2 else (-1.0 if side == 3 else 0.0)
        h = hx if side < 2 else hy
        m = 0
        for i in range(n):
            j = i + 1 if i + 1 < n else 0
            di = nx * src_x[i] + ny * src_y[i] - h
            dj = nx * src_x[j] + ny * src_y[j] - h
            if di <= 0:
                dst_x[m] = src_x[i]
                dst_y[m] = src_y[i]
                m += 1
            if (di <= 0) != (dj <= 0):
                t = di / (di - dj)
                dst_x[m] = src_x[i] + t * (src_x[j] - src_x[i])
                dst_y[m] = src_y[i] + t * (src_y[j] - src_y[i])
                m += 1
        n = m
        if n == 0:
            return 0.0
        src_x, src_y, dst_x, dst_y = dst_x, dst_y, src_x, src_y
    area = 0.0
    for i in range(n):
        j = i + 1 if i + 1 < n else 0
        area += src_x[i] * src_y[j] - src_x[j] * src_y[i]
    return abs(area) * 0.5

@_jit
def _nb_iou_exact(a, b, bx, by, cx, cy, min_union):
    """inter / max(union, min_union), clamped to [0, 1]; 0 when that denominator is not > 0."""
    inter = _nb_inter_area(a, b, bx, by, cx, cy)
    union = max(a[2] * a[3] + b[2] * b[3] - inter, min_union)
    if not union > 0:
        return 0.0
    return min(max(inter / union, 0.0), 1.0)

@_jit
def _nb_pair(a, b, bx, by, cx, cy, area, min_union):
    """The intersection area (area=True) or the IoU of rows a, b."""
    if area:
        return _nb_inter_area(a, b, bx, by, cx, cy)
    return _nb_iou_exact(a, b, bx, by, cx, cy, min_union)

@_jit
def _nb_apart(a, b, ra, rb):
    """True when the circumscribed circles (radii = half diagonals) do not meet: IoU 0."""
    dx, dy = a[0] - b[0], a[1] - b[1]
    r = ra + rb
    return dx * dx + dy * dy > r * r

@_jit
def _nb_half_diagonals(rows):
    out = np.empty(rows.shape[0])
    for i in range(rows.shape[0]):
        out[i] = 0.5 * np.sqrt(rows[i, 2] * rows[i, 2] + rows[i, 3] * rows[i, 3]) * (1 + 1e-12)
    return out

@_jit
def _nb_pair_matrix(a, b, out, area, min_union):
    """out[i, j] = IoU (or intersection area) of a[i], b[j]; out starts at zero."""
    buf = np.empty((4, 16))
    bx, by, cx, cy = buf[0], buf[1], buf[2], buf[3]
    ra, rb = _nb_half_diagonals(a), _nb_half_diagonals(b)
    for i in range(a.shape[0]):
        for j in range(b.shape[0]):
            if not _nb_apart(a[i], b[j], ra[i], rb[j]):
                out[i, j] = _nb_pair(a[i], b[j], bx, by, cx, cy, area, min_union)

@_jit
def _nb_pair_aligned(a, b, out, area, min_union):
    buf = np.empty((4, 16))
    bx, by, cx, cy = buf[0], buf[1], buf[2], buf[3]
    ra, rb = _nb_half_diagonals(a), _nb_half_diagonals(b)
    for i in range(a.shape[0]):
        if not _nb_apart(a[i], b[i], ra[i], rb[i]):
            out[i] = _nb_pair(a[i], b[i], bx, by, cx, cy, area, min_union)

@_jit
def _nb_nms_sorted(b, thr, post_max, min_union, keep):
    """b: rows sorted by decreasing score; keep[k] = row index of the k-th kept box; returns the count."""
    buf = np.empty((4, 16))
    bx, by, cx, cy = buf[0], buf[1], buf[2], buf[3]
    r = _nb_half_diagonals(b)
    n = b.shape[0]
    suppressed = np.zeros(n, dtype=np.bool_)
    nk = 0
    for i in range(n):
        if suppressed[i]:
            continue
        keep[nk] = i
        nk += 1
        if nk >= post_max:
            break
        for j in range(i + 1, n):
            if suppressed[j] or _nb_apart(b[i], b[j], r[i], r[j]):
                continue
            if _nb_iou_exact(b[i], b[j], bx, by, cx, cy, min_union) > thr:
                suppressed[j] = True
    return nk

@_jit
def _nb_greedy_from_mask(over, post_max, keep):
    """over[i, j]: row i suppresses row j (rows sorted by decreasing score, only j > i is read)."""
    n = over.shape[0]
    suppressed = np.zeros(n, dtype=np.bool_)
    nk = 0
    for i in range(n):
        if suppressed[i]:
            continue
        keep[nk] = i
        nk += 1
        if nk >= post_max:
            break
        for j in range(i + 1, n):
            if over[i, j]:
                suppressed[j] = True
    return nk

@_jit
def _nb_circle_sorted(xy, thr, post_max, keep):
    """xy sorted by decreasing score; squared distance in xy's dtype, compared with thr in float64."""
    n = xy.shape[0]
    suppressed = np.zeros(n, dtype=np.bool_)
    nk = 0
    for i in range(n):
        if suppressed[i]:
            continue
        keep[nk] = i
        nk += 1
        if nk >= post_max:
            break
        for j in range(i + 1, n):
            if not suppressed[j]:
                dx = xy[i, 0] - xy[j, 0]
                dy = xy[i, 1] - xy[j, 1]
                if dx * dx + dy * dy <= thr:
                    suppressed[j] = True
    return nk

@_jit
def _nb_points_in_boxes(pts, tab, out):
    """tab rows: (x, y, z, dx/2, dy/2, dz/2, cos, sin, reach^2)."""
    for i in range(pts.shape[0]):
        px, py, pz = pts[i, 0], pts[i, 1], pts[i, 2]
        for m in range(tab.shape[0]):
            dx, dy = px - tab[m, 0], py - tab[m, 1]
            if dx * dx + dy * dy > tab[m, 8] or abs(pz - tab[m, 2]) > tab[m, 5]:
                continue
            lx = dx * tab[m, 6] + dy * tab[m, 7]
            ly = -dx * tab[m, 7] + dy * tab[m, 6]
            out[i, m] = abs(lx) <= tab[m, 3] and abs(ly) <= tab[m, 4]


def _bev_rows(boxes: torch.Tensor) -> np.ndarray:
    """(N, 7+) → (N, 5) float64 (x, y, dx, dy, yaw), contiguous."""
    return np.ascontiguousarray(boxes.detach()[:, [0, 1, 3, 4, 6]].cpu().double().numpy())


def rotated_iou_bev(a: torch.Tensor, b: torch.Tensor, aligned: bool, area: bool = False,
                    min_union: float = 0.0) -> torch.Tensor:
    """IoU, or with area=True the intersection area (m^2), of the BEV rectangles; float64 math, a's dtype."""
    ra, rb = _bev_rows(a), _bev_rows(b)
    if aligned:
        out = np.zeros(len(ra))
        _nb_pair_aligned(ra, rb, out, bool(area), float(min_union))
    else:
        out = np.zeros((len(ra), len(rb)))
        _nb_pair_matrix(ra, rb, out, bool(area), float(min_union))
    return torch.from_numpy(out).to(a.dtype)


def nms_sorted(boxes_sorted: torch.Tensor, iou_threshold: float, post_max: int,
               min_union: float = 0.0) -> torch.Tensor:
    """Greedy NMS over boxes already sorted by score; returns positions in that order (int64)."""
    keep = np.empty(len(boxes_sorted), dtype=np.int64)
    n = _nb_nms_sorted(_bev_rows(boxes_sorted), float(iou_threshold), int(post_max), float(min_union), keep)
    return torch.from_numpy(keep[:n].copy())


def greedy_from_mask(over: torch.Tensor, post_max: int) -> torch.Tensor:
    o = np.ascontiguousarray(over.cpu().numpy())
    keep = np.empty(o.shape[0], dtype=np.int64)
    n = _nb_greedy_from_mask(o, int(post_max), keep)
    return torch.from_numpy(keep[:n].copy())


def circle_nms_sorted(xy_sorted: torch.Tensor, dist_threshold: float, post_max: int) -> torch.Tensor:
    """Greedy circle NMS over centres sorted by score (float32, or float64); positions in that order."""
    xy = np.ascontiguousarray(xy_sorted.detach().cpu().numpy())
    keep = np.empty(len(xy), dtype=np.int64)
    n = _nb_circle_sorted(xy, float(dist_threshold), int(post_max), keep)
    return torch.from_numpy(keep[:n].copy())


def box_table(boxes: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(M, 7+) → (M, 9) (x, y, z, dx/2, dy/2, dz/2, cos yaw, sin yaw, (half diagonal)^2) in `dtype`."""
    b = boxes.detach().to(dtype)
    half = b[:, 3:6] / 2
    return torch.cat([b[:, :3], half, torch.cos(b[:, 6:7]), torch.sin(b[:, 6:7]),
                      (half[:, :2] ** 2).sum(1, keepdim=True)], 1).contiguous()


def points_in_boxes(points: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    pts = np.ascontiguousarray(points.detach()[:, :3].double().numpy())
    # the reject radius gets a relative margin so that rounding never rejects a point on a corner
    tab = box_table(boxes, torch.float64)
    tab[:, 8] = tab[:, 8] * (1 + 1e-9) + 1e-12
    out = np.zeros((len(pts), len(tab)), dtype=np.bool_)
    _nb_points_in_boxes(pts, tab.numpy(), out)
    return torch.from_numpy(out)
