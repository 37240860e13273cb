"""Rigid transforms and quaternions (numpy, float64).

Quaternions are (w, x, y, z) as in nuScenes. A transform `a2b` is a 4×4 matrix that maps homogeneous
points of frame a to frame b: `p_b = a2b @ p_a`.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

__all__ = [
    "quaternion_to_matrix",
    "matrix_to_quaternion",
    "yaw_to_quaternion",
    "quaternion_yaw",
    "make_transform",
    "invert_transform",
    "transform_points",
]


def quaternion_to_matrix(q: Sequence[float]) -> np.ndarray:
    """(w, x, y, z) quaternion (normalised here) → 3×3 rotation matrix."""
    w, x, y, z = np.asarray(q, dtype=np.float64) / np.linalg.norm(q)
    return np.array([
        [1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
        [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
        [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)],
    ])


def matrix_to_quaternion(R: np.ndarray) -> np.ndarray:
    """3×3 rotation matrix → (w, x, y, z) quaternion with w ≥ 0."""
    R = np.asarray(R, dtype=np.float64)
    trace = np.trace(R)
    if trace > 0:
        s = 2.0 * np.sqrt(trace + 1.0)
        q = [0.25 * s, (R[2, 1] - R[1, 2]) / s, (R[0, 2] - R[2, 0]) / s, (R[1, 0] - R[0, 1]) / s]
    elif R[0, 0] > R[1, 1] and R[0, 0] > R[2, 2]:
        s = 2.0 * np.sqrt(1.0 + R[0, 0] - R[1, 1] - R[2, 2])
        q = [(R[2, 1] - R[1, 2]) / s, 0.25 * s, (R[0, 1] + R[1, 0]) / s, (R[0, 2] + R[2, 0]) / s]
    elif R[1, 1] > R[2, 2]:
        s = 2.0 * np.sqrt(1.0 + R[1, 1] - R[0, 0] - R[2, 2])
        q = [(R[0, 2] - R[2, 0]) / s, (R[0, 1] + R[1, 0]) / s, 0.25 * s, (R[1, 2] + R[2, 1]) / s]
    else:
        s = 2.0 * np.sqrt(1.0 + R[2, 2] - R[0, 0] - R[1, 1])
        q = [(R[1, 0] - R[0, 1]) / s, (R[0, 2] + R[2, 0]) / s, (R[1, 2] + R[2, 1]) / s, 0.25 * s]
    q = np.asarray(q)
    q /= np.linalg.norm(q)
    return -q if q[0] < 0 else q


def yaw_to_quaternion(yaw: float) -> np.ndarray:
    """Rotation by `yaw` radians about +z as a (w, x, y, z) quaternion."""
    return np.array([np.cos(yaw / 2), 0.0, 0.0, np.sin(yaw / 2)])


def quaternion_yaw(q: Sequence[float]) -> float:
    """Heading of the rotated x axis in the xy plane (radians, counter-clockwise from +x)."""
    R = quaternion_to_matrix(q)
    return float(np.arctan2(R[1, 0], R[0, 0]))


def make_transform(rotation: np.ndarray | Sequence[float], translation: Sequence[float]) -> np.ndarray:
    """4×4 transform from a 3×3 matrix or a (w, x, y, z) quaternion and a translation."""
    rotation = np.asarray(rotation, dtype=np.float64)
    T = np.eye(4)
    T[:3, :3] = quaternion_to_matrix(rotation) if rotation.shape == (4,) else rotation
    T[:3, 3] = np.asarray(translation, dtype=np.float64)
    return T


def invert_transform(T: np.ndarray) -> np.ndarray:
    """Inverse of a rigid 4×4 transform (R^T, -R^T t)."""
    T = np.asarray(T, dtype=np.float64)
    inv = np.eye(4)
    inv[:3, :3] = T[:3, :3].T
    inv[:3, 3] = -T[:3, :3].T @ T[:3, 3]
    return inv


def transform_points(T: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Apply a 4×4 transform to (N, 3+) points; extra columns are kept unchanged."""
    points = np.asarray(points)
    out = points.copy()
    out[:, :3] = points[:, :3] @ T[:3, :3].T + T[:3, 3]
    return out
