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
`limit_period`, `official_to_internal`, `internal_to_official` and `box_corners` take a numpy array
(float64 result) or a torch tensor (same dtype and device, differentiable); the other helpers here are
the numpy conveniences of the data pipeline. The geometry itself (corners, IoU, NMS, points-in-boxes)
lives once, in `bevfusion.ops.boxes`; `box_corners` and `points_in_boxes_np` call it.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from bevfusion.ops.boxes import box_corners_3d, points_in_boxes

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
    """Wrap angles into [-offset*period, (1-offset)*period): the default gives [-pi, pi).

    `angle` is a number, a numpy array or a torch tensor (the result has its type, dtype and device).
    """
    if isinstance(angle, torch.Tensor):
        return angle - torch.floor(angle / period + offset) * period
    return angle - np.floor(angle / period + offset) * period


def official_to_internal(boxes):
    """(x, y, z, w, l, h, yaw_mm, ...) → (x, y, z, l, w, h, yaw, ...); extra columns are kept, z unchanged.

    Args:
        boxes: (M, 7+) numpy array (or nested list) or torch tensor.
    Returns:
        A new float64 numpy array for numpy input ((0, 7) for an empty 1-D input); a new tensor of the
        same dtype and device for a tensor (yaw wrapped in that dtype).
    """
    if isinstance(boxes, torch.Tensor):
        out = boxes.clone()
        out[:, 3], out[:, 4] = boxes[:, 4], boxes[:, 3]
        out[:, 6] = limit_period(-boxes[:, 6] - math.pi / 2)
        return out
    boxes = np.asarray(boxes, dtype=np.float64)
    out = boxes.copy()
    if len(boxes) == 0:
        return out.reshape(0, boxes.shape[-1] if boxes.ndim == 2 else 7)
    out[:, 3], out[:, 4] = boxes[:, 4], boxes[:, 3]
    out[:, 6] = limit_period(-boxes[:, 6] - np.pi / 2)
    return out


def internal_to_official(boxes):
    """Inverse of `official_to_internal` (yaw_mm wrapped to [-pi, pi)), numpy or torch alike. The map is
    its own inverse: swapping the two sizes twice and applying yaw -> -yaw - pi/2 twice give back the input."""
    return official_to_internal(boxes)


def rotation_z(angle: float) -> np.ndarray:
    """3×3 counter-clockwise rotation about +z (column-vector convention: p' = R @ p)."""
    c, s = np.cos(angle), np.sin(angle)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def box_corners(boxes):
    """(M, 7+) internal boxes → (M, 8, 3) corners (`bevfusion.ops.boxes.box_corners_3d`).

    Corner order: bottom face first (z - dz/2), counter-clockwise seen from above starting at the
    front-left corner (+dx/2, +dy/2), then the top face in the same order. A numpy array (or list) gives
    a float64 numpy array; a tensor gives a tensor of its dtype and device.
    """
    if isinstance(boxes, torch.Tensor):
        return box_corners_3d(boxes)
    boxes = np.ascontiguousarray(boxes, dtype=np.float64)
    return box_corners_3d(torch.from_numpy(boxes)).numpy()


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

    Faces are inclusive, decided in float64 by `bevfusion.ops.boxes.points_in_boxes` (numba on the CPU).
    `eps` grows every box by that margin (metres) on each face; a negative `eps` shrinks it, and a box
    shrunk below zero size holds no point.
    """
    points = np.asarray(points, dtype=np.float64)
    boxes = np.asarray(boxes, dtype=np.float64)
    if len(boxes) == 0 or len(points) == 0:
        return np.zeros((len(points), len(boxes)), dtype=bool)
    boxes = np.array(boxes[:, :7], copy=True)
    empty = np.zeros(len(boxes), dtype=bool)
    if eps:
        boxes[:, 3:6] += 2 * eps
        empty = (boxes[:, 3:6] < 0).any(axis=1)
        boxes[empty, 3:6] = 0.0
    inside = points_in_boxes(torch.from_numpy(np.ascontiguousarray(points[:, :3])), torch.from_numpy(boxes)).numpy()
    inside[:, empty] = False
    return inside
