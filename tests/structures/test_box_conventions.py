"""Box conventions and transforms against the nuScenes devkit's Box and pyquaternion."""
from __future__ import annotations

import numpy as np
import pytest

pyquaternion = pytest.importorskip("pyquaternion")
from nuscenes.utils.data_classes import Box  # noqa: E402
from nuscenes.utils.geometry_utils import points_in_box  # noqa: E402

from bevfusion.structures.boxes import (  # noqa: E402
    box_corners,
    flip_boxes,
    internal_to_official,
    limit_period,
    official_to_internal,
    points_in_boxes_np,
    rotate_boxes,
    rotation_z,
    scale_boxes,
)
from bevfusion.structures.geometry import (  # noqa: E402
    invert_transform,
    make_transform,
    matrix_to_quaternion,
    quaternion_to_matrix,
    quaternion_yaw,
    transform_points,
)


def _random_devkit_boxes(rng, n=20):
    boxes = []
    for _ in range(n):
        center = rng.uniform(-40, 40, 3)
        wlh = rng.uniform(0.3, 6.0, 3)
        yaw = rng.uniform(-np.pi, np.pi)
        boxes.append(Box(center, wlh, pyquaternion.Quaternion(axis=[0, 0, 1], angle=yaw)))
    return boxes


def _same_corner_sets(a, b, atol=1e-9):
    """Corners as unordered sets (8 points each)."""
    for ca, cb in zip(a, b):
        d = np.linalg.norm(ca[:, None] - cb[None], axis=-1)
        assert np.all(d.min(axis=1) < atol) and np.all(d.min(axis=0) < atol)


def test_quaternions_agree_with_pyquaternion():
    rng = np.random.default_rng(0)
    for _ in range(50):
        q = pyquaternion.Quaternion(rng.normal(size=4)).normalised
        R = quaternion_to_matrix(q.elements)
        np.testing.assert_allclose(R, q.rotation_matrix, atol=1e-12)
        back = matrix_to_quaternion(R)
        assert min(np.abs(back - q.elements).max(), np.abs(back + q.elements).max()) < 1e-9
        # Heading of the rotated x axis, checked directly on the matrix.
        heading = np.arctan2(*(q.rotate([1.0, 0.0, 0.0])[1::-1]))
        assert quaternion_yaw(q.elements) == pytest.approx(heading, abs=1e-9)
        # For rotations about z alone (every nuScenes box), it is the devkit's yaw.
        qz = pyquaternion.Quaternion(axis=[0, 0, 1], angle=rng.uniform(-np.pi, np.pi))
        assert quaternion_yaw(qz.elements) == pytest.approx(qz.yaw_pitch_roll[0], abs=1e-9)


def test_transforms_invert_and_apply():
    rng = np.random.default_rng(1)
    T = make_transform(pyquaternion.Quaternion(rng.normal(size=4)).normalised.elements, rng.normal(size=3))
    np.testing.assert_allclose(invert_transform(T), np.linalg.inv(T), atol=1e-12)
    pts = np.concatenate([rng.normal(size=(10, 3)), np.arange(10)[:, None]], axis=1)
    out = transform_points(T, pts)
    np.testing.assert_allclose(out[:, :3], (T @ np.c_[pts[:, :3], np.ones(10)].T).T[:, :3], atol=1e-12)
    np.testing.assert_array_equal(out[:, 3], pts[:, 3])


def test_official_and_internal_boxes_have_the_devkit_corners():
    rng = np.random.default_rng(2)
    dev = _random_devkit_boxes(rng)
    # What the official converter stores: centre, wlh, -yaw - pi/2.
    official = np.array([[*b.center, *b.wlh, -b.orientation.yaw_pitch_roll[0] - np.pi / 2] for b in dev])
    internal = official_to_internal(official)
    _same_corner_sets(box_corners(internal), [b.corners().T for b in dev])
    np.testing.assert_allclose(internal[:, 6], [b.orientation.yaw_pitch_roll[0] for b in dev], atol=1e-12)
    back = internal_to_official(internal)
    np.testing.assert_allclose(back[:, :6], official[:, :6])
    np.testing.assert_allclose(limit_period(back[:, 6] - official[:, 6]), 0, atol=1e-12)


def test_corner_order_front_left_first():
    corners = box_corners(np.array([[0, 0, 0, 4.0, 2.0, 1.0, np.pi / 2]]))[0]
    np.testing.assert_allclose(corners[0], [-1.0, 2.0, -0.5], atol=1e-12)  # heading +y, left is -x
    np.testing.assert_allclose(corners[4], [-1.0, 2.0, 0.5], atol=1e-12)


def test_points_in_boxes_agrees_with_devkit():
    rng = np.random.default_rng(3)
    dev = _random_devkit_boxes(rng, 8)
    internal = official_to_internal(
        np.array([[*b.center, *b.wlh, -b.orientation.yaw_pitch_roll[0] - np.pi / 2] for b in dev]))
    pts = np.concatenate([rng.uniform(-45, 45, (3000, 3)),
                          np.concatenate([b.center + rng.uniform(-2, 2, (100, 3)) for b in dev])])
    ours = points_in_boxes_np(pts, internal)
    ref = np.stack([points_in_box(b, pts.T) for b in dev], axis=1)
    assert ours.sum() > 100
    np.testing.assert_array_equal(ours, ref)


@pytest.mark.parametrize("op", ["rotate", "flip_x", "flip_y", "scale"])
def test_box_transforms_match_transformed_corners(op):
    rng = np.random.default_rng(4)
    boxes = np.concatenate([rng.uniform(-30, 30, (10, 3)), rng.uniform(0.5, 5, (10, 3)),
                            rng.uniform(-np.pi, np.pi, (10, 1)), rng.normal(size=(10, 2))], axis=1)
    if op == "rotate":
        angle = 0.7
        out, M = rotate_boxes(boxes, angle), rotation_z(angle)
    elif op == "flip_x":
        out, M = flip_boxes(boxes, "x"), np.diag([-1.0, 1.0, 1.0])
    elif op == "flip_y":
        out, M = flip_boxes(boxes, "y"), np.diag([1.0, -1.0, 1.0])
    else:
        out, M = scale_boxes(boxes, 1.07), np.eye(3) * 1.07
    _same_corner_sets(box_corners(out), box_corners(boxes) @ M.T, atol=1e-9)
    np.testing.assert_allclose(np.c_[out[:, 7:9], np.zeros(10)], np.c_[boxes[:, 7:9], np.zeros(10)] @ M.T,
                               atol=1e-12)
    assert np.all((out[:, 6] >= -np.pi) & (out[:, 6] < np.pi))
    with pytest.raises(ValueError):
        flip_boxes(boxes, "z")
