"""3D boxes in the LiDAR frame: our internal convention and the official one.

Internal convention (used by the data pipeline, the ops and the evaluation code):
    (x, y, z, dx, dy, dz, yaw[, vx, vy]) with (x, y, z) the geometric centre, dx the size along the
    heading (nuScenes length), dy across it (width), dz the height, yaw the heading counter-clockwise
    from +x in radians (the nuScenes devkit's yaw in the LiDAR frame), velocity in m/s.

Official convention (old mmdet3d, used by the official info files and checkpoints):
    (x, y, z, w, l, h, yaw_mm[, vx, vy]) with w the size along x at yaw_mm = 0 and
    yaw_mm = -yaw - pi/2. The info files store the geometric-centre z there too; the official code
    treats that value as the bottom of the box (the "z quirk", facts §6.3), which only matters inside
    the detection head, which converts at its own boundary.

Conversions happen only where official data enters or leaves (info files, checkpoints, heads).
"""
from __future__ import annotations

import numpy as np

__all__ = [
    "limit_period",
    "official_to_internal",
    "internal_to_official",
    "box_corners",
    "rotation_z",
    "rotate_boxes",
    "flip_boxes",
    "scale_boxes",
    "translate_boxes",
    "points_in_boxes_np",
]


def limit_period(angle, offset: float = 0.5, period: float = 2 * np.pi):
    """Wrap angles into [-offset*period, (1-offset)*period): the default gives [-pi, pi)."""
    return angle - np.floor(angle / period + offset) * period


def official_to_internal(boxes: np.ndarray) -> np.ndarray:
    """(x, y, z, w, l, h, yaw_mm, ...) → (x, y, z, l, w, h, yaw, ...); extra columns are kept."""
    boxes = np.asarray(boxes, dtype=np.float64)
    out = boxes.copy()
    if len(boxes) == 0:
        return out.reshape(0, boxes.shape[-1] if boxes.ndim == 2 else 7)
    out[:, 3], out[:, 4] = boxes[:, 4], boxes[:, 3]
    out[:, 6] = limit_period(-boxes[:, 6] - np.pi / 2)
    return out


def internal_to_official(boxes: np.ndarray) -> np.ndarray:
    """Inverse of `official_to_internal` (yaw_mm wrapped to [-pi, pi)). The map is its own inverse:
    swapping the two sizes twice and applying yaw -> -yaw - pi/2 twice give back the input."""
    return official_to_internal(boxes)


def rotation_z(angle: float) -> np.ndarray:
    """3×3 counter-clockwise rotation about +z (column-vector convention: p' = R @ p)."""
    c, s = np.cos(angle), np.sin(angle)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def box_corners(boxes: np.ndarray) -> np.ndarray:
    """(M, 7+) internal boxes → (M, 8, 3) corners.

    Corner order: bottom face first (z - dz/2), counter-clockwise seen from above starting at the
    front-left corner (+dx/2, +dy/2), then the top face in the same order.
    """
    boxes = np.asarray(boxes, dtype=np.float64)
    signs = np.array([[1, 1], [-1, 1], [-1, -1], [1, -1]], dtype=np.float64)
    local = np.zeros((8, 3))
    local[:4, :2] = signs * 0.5
    local[4:, :2] = signs * 0.5
    local[:4, 2], local[4:, 2] = -0.5, 0.5
    corners = local[None] * boxes[:, None, 3:6]  # (M, 8, 3)
    c, s = np.cos(boxes[:, 6]), np.sin(boxes[:, 6])
    x = corners[..., 0] * c[:, None] - corners[..., 1] * s[:, None]
    y = corners[..., 0] * s[:, None] + corners[..., 1] * c[:, None]
    return np.stack([x, y, corners[..., 2]], axis=-1) + boxes[:, None, :3]


def rotate_boxes(boxes: np.ndarray, angle: float) -> np.ndarray:
    """Rotate boxes (and velocities) counter-clockwise by `angle` about the LiDAR z axis."""
    out = np.array(boxes, dtype=np.float64, copy=True)
    R = rotation_z(angle)[:2, :2]
    out[:, :2] = out[:, :2] @ R.T
    out[:, 6] = limit_period(out[:, 6] + angle)
    if out.shape[1] >= 9:
        out[:, 7:9] = out[:, 7:9] @ R.T
    return out


def flip_boxes(boxes: np.ndarray, axis: str) -> np.ndarray:
    """Mirror boxes: axis "y" negates y (a left/right flip), axis "x" negates x."""
    out = np.array(boxes, dtype=np.float64, copy=True)
    if axis == "y":
        out[:, 1] *= -1
        out[:, 6] = limit_period(-out[:, 6])
        if out.shape[1] >= 9:
            out[:, 8] *= -1
    elif axis == "x":
        out[:, 0] *= -1
        out[:, 6] = limit_period(np.pi - out[:, 6])
        if out.shape[1] >= 9:
            out[:, 7] *= -1
    else:
        raise ValueError(f"flip axis must be 'x' or 'y', got {axis!r}")
    return out


def scale_boxes(boxes: np.ndarray, factor: float) -> np.ndarray:
    """Scale centres, sizes and velocities by `factor` about the LiDAR origin."""
    out = np.array(boxes, dtype=np.float64, copy=True)
    out[:, :6] *= factor
    if out.shape[1] >= 9:
        out[:, 7:9] *= factor
    return out


def translate_boxes(boxes: np.ndarray, offset) -> np.ndarray:
    out = np.array(boxes, dtype=np.float64, copy=True)
    out[:, :3] += np.asarray(offset, dtype=np.float64)
    return out


def points_in_boxes_np(points: np.ndarray, boxes: np.ndarray, eps: float = 0.0) -> np.ndarray:
    """(P, 3+) points, (M, 7+) internal boxes → (P, M) bool, True where a point lies inside a box.

    `eps` grows every box by that margin (metres) on each face. Points are sorted by x once and each
    box is tested only against the points within its x extent.
    """
    points = np.asarray(points, dtype=np.float64)
    boxes = np.asarray(boxes, dtype=np.float64)
    out = np.zeros((len(points), len(boxes)), dtype=bool)
    if len(boxes) == 0 or len(points) == 0:
        return out
    order = np.argsort(points[:, 0], kind="stable")
    xs = points[order, 0]
    half = boxes[:, 3:6] / 2 + eps
    reach = np.hypot(half[:, 0], half[:, 1])
    lo = np.searchsorted(xs, boxes[:, 0] - reach, side="left")
    hi = np.searchsorted(xs, boxes[:, 0] + reach, side="right")
    for m in range(len(boxes)):
        idx = order[lo[m]:hi[m]]
        if not len(idx):
            continue
        d = points[idx, :3] - boxes[m, :3]
        c, s = np.cos(boxes[m, 6]), np.sin(boxes[m, 6])
        inside = (np.abs(d[:, 0] * c + d[:, 1] * s) <= half[m, 0]) & \
            (np.abs(-d[:, 0] * s + d[:, 1] * c) <= half[m, 1]) & (np.abs(d[:, 2]) <= half[m, 2])
        out[idx[inside], m] = True
    return out
