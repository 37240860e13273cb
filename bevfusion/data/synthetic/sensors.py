"""The sensor rig: LIDAR_TOP and the six 1600x900 cameras, placed like the official nuScenes rig.

Frames follow nuScenes: ego x forward, y left, z up; LIDAR_TOP x right, y forward, z up; cameras
x right, y down, z along the optical axis. Rotations are (w, x, y, z) quaternions.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Channel order of the official info files (and of the model's image stack).
CAMERA_NAMES = ("CAM_FRONT", "CAM_FRONT_RIGHT", "CAM_FRONT_LEFT", "CAM_BACK", "CAM_BACK_LEFT", "CAM_BACK_RIGHT")
LIDAR_NAME = "LIDAR_TOP"
FULL_WIDTH, FULL_HEIGHT = 1600, 900

# (translation in the ego frame [m], optical-axis yaw [deg, CCW from ego x], focal [px], cx, cy) at
# 1600x900, close to the published nuScenes calibration of the Singapore/Boston cars.
_CAMERAS = {
    "CAM_FRONT": ((1.70, 0.016, 1.51), 0.0, 1266.4, 816.3, 491.5),
    "CAM_FRONT_RIGHT": ((1.55, -0.493, 1.50), -55.0, 1260.8, 808.0, 495.3),
    "CAM_FRONT_LEFT": ((1.52, 0.495, 1.51), 55.0, 1272.6, 826.6, 479.8),
    "CAM_BACK": ((0.028, 0.003, 1.58), 180.0, 809.2, 829.2, 481.8),
    "CAM_BACK_LEFT": ((1.036, 0.485, 1.59), 110.0, 1256.7, 792.1, 492.8),
    "CAM_BACK_RIGHT": ((1.015, -0.481, 1.56), -110.0, 1259.5, 807.3, 501.2),
}
LIDAR_TRANSLATION = (0.944, 0.0, 1.84)

# Velodyne HDL-32E-like: 32 beams from -30.67 to +10.67 deg, 20 Hz.
LIDAR_ELEVATIONS_DEG = np.linspace(-30.67, 10.67, 32)
LIDAR_MAX_RANGE = 70.0
LIDAR_MIN_RANGE = 1.0


def rot_z(yaw: float) -> np.ndarray:
    c, s = np.cos(yaw), np.sin(yaw)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def yaw_quaternion(yaw: float) -> list[float]:
    """(w, x, y, z) of a rotation by `yaw` radians about +z."""
    return [float(np.cos(yaw / 2)), 0.0, 0.0, float(np.sin(yaw / 2))]


def matrix_to_quaternion(r: np.ndarray) -> list[float]:
    """(w, x, y, z), w >= 0, of a 3x3 rotation matrix."""
    m = np.asarray(r, dtype=np.float64)
    tr = np.trace(m)
    if tr > 0:
        s = np.sqrt(tr + 1.0) * 2
        q = [0.25 * s, (m[2, 1] - m[1, 2]) / s, (m[0, 2] - m[2, 0]) / s, (m[1, 0] - m[0, 1]) / s]
    elif m[0, 0] > m[1, 1] and m[0, 0] > m[2, 2]:
        s = np.sqrt(1.0 + m[0, 0] - m[1, 1] - m[2, 2]) * 2
        q = [(m[2, 1] - m[1, 2]) / s, 0.25 * s, (m[0, 1] + m[1, 0]) / s, (m[0, 2] + m[2, 0]) / s]
    elif m[1, 1] > m[2, 2]:
        s = np.sqrt(1.0 + m[1, 1] - m[0, 0] - m[2, 2]) * 2
        q = [(m[0, 2] - m[2, 0]) / s, (m[0, 1] + m[1, 0]) / s, 0.25 * s, (m[1, 2] + m[2, 1]) / s]
    else:
        s = np.sqrt(1.0 + m[2, 2] - m[0, 0] - m[1, 1]) * 2
        q = [(m[1, 0] - m[0, 1]) / s, (m[0, 2] + m[2, 0]) / s, (m[1, 2] + m[2, 1]) / s, 0.25 * s]
    q = np.asarray(q)
    q = q / np.linalg.norm(q)
    if q[0] < 0:
        q = -q
    return [float(v) for v in q]


def quaternion_to_matrix(q) -> np.ndarray:
    w, x, y, z = (float(v) for v in q)
    return np.array([
        [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
        [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
        [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
    ])


@dataclass(frozen=True)
class Sensor:
    """One calibrated sensor. `rotation`/`translation` map sensor coordinates to the ego frame."""

    channel: str
    modality: str  # "lidar" or "camera"
    translation: tuple[float, float, float]
    rotation: tuple[float, float, float, float]
    intrinsic: tuple[tuple[float, ...], ...] | None = None  # 3x3, cameras only
    width: int = 0
    height: int = 0

    @property
    def to_ego(self) -> np.ndarray:
        t = np.eye(4)
        t[:3, :3] = quaternion_to_matrix(self.rotation)
        t[:3, 3] = self.translation
        return t


def _camera_base() -> np.ndarray:
    # Columns: the camera's x (right), y (down), z (forward) axes in the ego frame for a front camera.
    return np.array([[0.0, 0.0, 1.0], [-1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])


def build_rig(image_size: tuple[int, int] = (FULL_WIDTH, FULL_HEIGHT)) -> dict[str, Sensor]:
    """LIDAR_TOP plus the six cameras; intrinsics scaled to `image_size` (width, height)."""
    width, height = int(image_size[0]), int(image_size[1])
    sx, sy = width / FULL_WIDTH, height / FULL_HEIGHT
    # LIDAR_TOP: x right, y forward, i.e. rotated by -90 deg about z from the ego frame.
    rig = {LIDAR_NAME: Sensor(LIDAR_NAME, "lidar", LIDAR_TRANSLATION,
                              tuple(matrix_to_quaternion(rot_z(-np.pi / 2))))}
    for name, (t, yaw_deg, f, cx, cy) in _CAMERAS.items():
        r = rot_z(np.deg2rad(yaw_deg)) @ _camera_base()
        k = ((f * sx, 0.0, cx * sx), (0.0, f * sy, cy * sy), (0.0, 0.0, 1.0))
        rig[name] = Sensor(name, "camera", tuple(float(v) for v in t), tuple(matrix_to_quaternion(r)), k,
                           width, height)
    return rig


def lidar_ray_directions(azimuth_steps: int) -> tuple[np.ndarray, np.ndarray]:
    """Unit ray directions in the LIDAR_TOP frame and their ring index (0 = lowest beam).

    Returns:
        dirs: (32 * azimuth_steps, 3) float64; ring: (32 * azimuth_steps,) int.
    """
    el = np.deg2rad(LIDAR_ELEVATIONS_DEG)
    az = np.arange(azimuth_steps) * (2 * np.pi / azimuth_steps)
    el_g, az_g = np.meshgrid(el, az, indexing="ij")  # (32, A)
    dirs = np.stack([np.cos(el_g) * np.cos(az_g), np.cos(el_g) * np.sin(az_g), np.sin(el_g)], -1)
    ring = np.repeat(np.arange(len(el)), azimuth_steps)
    return dirs.reshape(-1, 3), ring
