"""The box conventions for numpy arrays and torch tensors alike: one function each, same numbers.

Official ↔ internal conversions and corners are checked against hand-written formulas (the official
corner set (±w/2, ±l/2) turned clockwise by yaw_mm) rather than against each other; `points_in_boxes_np`
and its `eps` margin against a float64 loop.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from bevfusion.structures.boxes import (box_corners, internal_to_official, limit_period, official_to_internal,
                                        points_in_boxes_np)


def _official(rng, n=30):
    return np.column_stack([rng.uniform(-50, 50, (n, 3)), rng.uniform(0.2, 8, (n, 3)), rng.uniform(-7, 7, n),
                            rng.normal(size=(n, 2))])


def _official_corners_bev(b):
    """Old mmdet3d: corners (±w/2, ±l/2) about the centre, rotated clockwise by yaw_mm."""
    x, y, _, w, l, _, yaw = b[:7]
    c, s = math.cos(yaw), math.sin(yaw)
    return [(x + u * c + v * s, y - u * s + v * c) for u in (-w / 2, w / 2) for v in (-l / 2, l / 2)]


@pytest.mark.parametrize("kind", ["numpy", "float64", "float32"])
def test_official_to_internal_by_hand(kind):
    off = _official(np.random.default_rng(0))
    arg = off if kind == "numpy" else torch.tensor(off, dtype=getattr(torch, kind))
    out = official_to_internal(arg)
    if kind == "numpy":
        assert isinstance(out, np.ndarray) and out.dtype == np.float64
    else:
        assert isinstance(out, torch.Tensor) and out.dtype == arg.dtype
        out = out.double().numpy()
    atol = 1e-12 if kind != "float32" else 2e-5 * 50
    np.testing.assert_allclose(out[:, [0, 1, 2, 5, 7, 8]], off[:, [0, 1, 2, 5, 7, 8]], atol=atol, rtol=0)
    np.testing.assert_allclose(out[:, 3], off[:, 4], rtol=1e-6)  # dx = l (along the heading)
    np.testing.assert_allclose(out[:, 4], off[:, 3], rtol=1e-6)
    assert np.all((out[:, 6] >= -math.pi - 1e-6) & (out[:, 6] < math.pi + 1e-6))
    # the same BEV rectangle: every official corner is a corner of ours
    ours = box_corners(out)[:, :4, :2]
    for b, c in zip(off, ours):
        for p in _official_corners_bev(b):
            assert np.min(np.linalg.norm(c - np.array(p), axis=1)) < (1e-9 if kind != "float32" else 1e-3)


def test_numpy_and_torch_give_the_same_numbers():
    off = _official(np.random.default_rng(1))
    t = torch.tensor(off)
    np.testing.assert_array_equal(official_to_internal(t).numpy(), official_to_internal(off))
    np.testing.assert_array_equal(internal_to_official(t).numpy(), internal_to_official(off))
    back = internal_to_official(official_to_internal(t))
    torch.testing.assert_close(back[:, :6], t[:, :6], rtol=0, atol=0)
    torch.testing.assert_close(limit_period(back[:, 6] - t[:, 6]), torch.zeros(len(t), dtype=t.dtype), rtol=0,
                               atol=1e-12)
    np.testing.assert_array_equal(box_corners(t).numpy(), box_corners(off))
    angles = np.linspace(-20, 20, 101)
    np.testing.assert_array_equal(limit_period(torch.tensor(angles)).numpy(), limit_period(angles))


def test_torch_input_is_not_modified_and_keeps_grad():
    t = torch.tensor(_official(np.random.default_rng(2)), dtype=torch.float32, requires_grad=True)
    before = t.detach().clone()
    out = official_to_internal(t)
    assert torch.equal(t.detach(), before)
    (out[:, 3] * 2 + out[:, 6]).sum().backward()
    np.testing.assert_allclose(t.grad[:, 4].numpy(), 2.0)  # dx comes from l
    np.testing.assert_allclose(t.grad[:, 6].numpy(), -1.0)  # yaw = -yaw_mm - pi/2 (wrapped)
    empty = official_to_internal(torch.zeros(0, 9))
    assert empty.shape == (0, 9)
    assert official_to_internal(np.zeros((0, 9))).shape == (0, 9)
    assert official_to_internal(np.zeros(0)).shape == (0, 7)


def test_box_corners_tensor_and_numpy():
    b = official_to_internal(_official(np.random.default_rng(3)))
    c_np = box_corners(b)
    assert c_np.shape == (len(b), 8, 3) and c_np.dtype == np.float64
    # by hand: front-left corner of the bottom face, then the top face above it
    for box, c in zip(b, c_np):
        x, y, z, dx, dy, dz, yaw = box[:7]
        fl = (x + dx / 2 * math.cos(yaw) - dy / 2 * math.sin(yaw), y + dx / 2 * math.sin(yaw) + dy / 2 * math.cos(yaw))
        np.testing.assert_allclose(c[0], [*fl, z - dz / 2], atol=1e-9)
        np.testing.assert_allclose(c[4], [*fl, z + dz / 2], atol=1e-9)
    t = box_corners(torch.tensor(b, dtype=torch.float32))
    assert t.dtype == torch.float32
    np.testing.assert_allclose(t.numpy(), c_np, atol=1e-4)
    assert box_corners(b[::2]).shape == (len(b[::2]), 8, 3)  # non-contiguous rows
    assert box_corners(np.zeros((0, 9))).shape == (0, 8, 3)


def _naive_inside(points, boxes, eps):
    out = np.zeros((len(points), len(boxes)), dtype=bool)
    for i, p in enumerate(points):
        for m, b in enumerate(boxes):
            half = [b[3] / 2 + eps, b[4] / 2 + eps, b[5] / 2 + eps]
            if min(half) < 0:
                continue
            dx, dy = p[0] - b[0], p[1] - b[1]
            c, s = math.cos(b[6]), math.sin(b[6])
            out[i, m] = (abs(dx * c + dy * s) <= half[0] and abs(-dx * s + dy * c) <= half[1]
                         and abs(p[2] - b[2]) <= half[2])
    return out


@pytest.mark.parametrize("eps", [0.0, 0.05, -0.05, -0.2])
def test_points_in_boxes_np_margin(eps):
    rng = np.random.default_rng(4)
    boxes = np.column_stack([rng.uniform(-3, 3, (6, 3)), rng.uniform(0.3, 2.5, (6, 3)), rng.uniform(-3, 3, 6),
                             np.zeros((6, 2))])
    boxes[5, 3:6] = [0.3, 0.3, 0.3]  # shrunk below zero size by eps = -0.2: holds nothing
    n = 12000
    points = np.concatenate([rng.uniform(-4, 4, (n, 2)), rng.uniform(-2, 2, (n, 1)), rng.normal(size=(n, 2))],
                            axis=1)
    got = points_in_boxes_np(points, boxes, eps=eps)
    expected = _naive_inside(points, boxes, eps)
    assert got.dtype == bool and got.shape == (n, 6)
    assert expected.sum() > 20
    assert np.array_equal(got, expected)
    if eps == -0.2:
        assert not got[:, 5].any()
    assert points_in_boxes_np(points[:0], boxes).shape == (0, 6)
    assert points_in_boxes_np(points, boxes[:0]).shape == (n, 0)
