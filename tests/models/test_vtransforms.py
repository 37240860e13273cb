"""View transforms: geometry vs forward projection, pooling vs a naive loop, depth image, shapes, keys."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from bevfusion.models.camera.vtransforms import DepthLSSTransform, LSSTransform
from bevfusion.structures.geometry import invert_transform, make_transform, yaw_to_quaternion


def _rig(B=1, N=6, image_size=(256, 704), seed=0):
    """Six cameras looking outwards (optical axis z forward, x right, y down), with random augmentations."""
    rng = np.random.default_rng(seed)
    H, W = image_size
    K = np.eye(4)
    K[:3, :3] = [[0.7 * W, 0, W / 2], [0, 0.7 * W, H / 2], [0, 0, 1]]
    cam2lidar, img_aug, lidar_aug = [], [], []
    for b in range(B):
        per = []
        for n in range(N):
            yaw = 2 * math.pi * n / N
            # camera axes in LiDAR frame: z_cam = heading, x_cam = right, y_cam = down
            fwd = np.array([math.cos(yaw), math.sin(yaw), 0.0])
            right = np.array([math.sin(yaw), -math.cos(yaw), 0.0])
            down = np.array([0.0, 0.0, -1.0])
            per.append(make_transform(np.stack([right, down, fwd], 1), [0.5 * fwd[0], 0.5 * fwd[1], 1.6]))
        cam2lidar.append(per)
        augs = []
        for n in range(N):
            A = np.eye(4)
            r, ang = rng.uniform(0.8, 1.1), rng.uniform(-0.1, 0.1)
            A[:2, :2] = r * np.array([[math.cos(ang), math.sin(ang)], [-math.sin(ang), math.cos(ang)]])
            A[:2, 3] = rng.uniform(-20, 20, 2)
            augs.append(A)
        img_aug.append(augs)
        L = make_transform(yaw_to_quaternion(rng.uniform(-0.5, 0.5)), rng.normal(0, 0.5, 3))
        L[:3, :3] *= rng.uniform(0.95, 1.05)
        lidar_aug.append(L)
    t = lambda a: torch.tensor(np.asarray(a), dtype=torch.float32)  # noqa: E731
    c2l = t(cam2lidar)
    intr = t(np.broadcast_to(K, (B, N, 4, 4)))
    l2c = t([[invert_transform(T) for T in row] for row in cam2lidar])
    return {"camera2lidar": c2l, "camera_intrinsics": intr, "img_aug_matrix": t(img_aug),
            "lidar_aug_matrix": t(lidar_aug), "lidar2camera": l2c, "lidar2image": intr @ l2c}


def _small_lss(cls=LSSTransform, **kw):
    args = dict(in_channels=8, out_channels=4, image_size=(64, 176), feature_size=(8, 22),
                xbound=[-20.0, 20.0, 1.0], ybound=[-20.0, 20.0, 1.0], zbound=[-10.0, 10.0, 20.0],
                dbound=[1.0, 20.0, 1.0], downsample=1)
    args.update(kw)
    return cls(**args)


def test_geometry_projects_back_onto_the_frustum():
    vt = _small_lss()
    rig = _rig(B=2, image_size=vt.image_size)
    geom = vt.get_geometry(rig["camera2lidar"], rig["camera_intrinsics"], rig["img_aug_matrix"],
                           rig["lidar_aug_matrix"]).double()  # (B, N, D, fH, fW, 3)
    B, N = geom.shape[:2]
    for b in range(B):
        pts = geom[b].reshape(N, -1, 3)
        L = rig["lidar_aug_matrix"][b].double()
        pts = (pts - L[:3, 3]) @ torch.linalg.inv(L[:3, :3]).T  # back to the un-augmented LiDAR frame
        for n in range(N):
            P = rig["lidar2image"][b, n].double()
            cam = pts[n] @ P[:3, :3].T + P[:3, 3]
            uv1 = torch.cat([cam[:, :2] / cam[:, 2:], torch.ones(len(cam), 1, dtype=torch.float64)], 1)
            A = rig["img_aug_matrix"][b, n].double()
            uv = uv1 @ A[:3, :3].T + A[:3, 3]
            expected = vt.frustum.reshape(-1, 3).double()
            torch.testing.assert_close(uv[:, :2], expected[:, :2], atol=2e-3, rtol=0)
            torch.testing.assert_close(cam[:, 2], expected[:, 2], atol=2e-4, rtol=0)


@pytest.mark.parametrize("fused", [True, False])
def test_pooling_matches_a_naive_scatter(fused):
    torch.manual_seed(0)
    vt = _small_lss(fused_lift=fused).eval()
    rig = _rig(B=2, image_size=vt.image_size, seed=1)
    img = torch.randn(2, 6, 8, 8, 22)
    with torch.no_grad():
        out = vt(img, None, None, None, rig["lidar2camera"], rig["lidar2image"], rig["camera_intrinsics"],
                 rig["camera2lidar"], rig["img_aug_matrix"], rig["lidar_aug_matrix"])
        depth, feats = vt.get_cam_feats(img)
        geom = vt.get_geometry(rig["camera2lidar"], rig["camera_intrinsics"], rig["img_aug_matrix"],
                               rig["lidar_aug_matrix"])
    # Naive float64 loop over every frustum point, with the official truncation toward zero.
    expected = torch.zeros(2, 4, 40, 40, dtype=torch.float64)
    lifted = (depth.double().unsqueeze(2) * feats.double().unsqueeze(1)).reshape(2, 6, vt.D, 4, 8, 22)
    cells = ((geom.double() - torch.tensor([-20.0, -20.0, -10.0], dtype=torch.float64)) /
             torch.tensor([1.0, 1.0, 20.0], dtype=torch.float64)).long()
    for b, n, d, i, j in np.ndindex(2, 6, vt.D, 8, 22):
        x, y, z = cells[b, n, d, i, j].tolist()
        if 0 <= x < 40 and 0 <= y < 40 and z == 0:
            expected[b, :, x, y] += lifted[b, n, d, :, i, j]
    assert out.shape == (2, 4, 40, 40)
    assert expected.abs().sum() > 0
    torch.testing.assert_close(out.double(), expected, atol=1e-4, rtol=1e-4)


def test_plan_is_cached_in_eval_and_refreshed_when_geometry_changes():
    vt = _small_lss().eval()
    rig = _rig(image_size=vt.image_size)
    img = torch.randn(1, 6, 8, 8, 22)
    args = (None, None, None, rig["lidar2camera"], rig["lidar2image"], rig["camera_intrinsics"], rig["camera2lidar"],
            rig["img_aug_matrix"], rig["lidar_aug_matrix"])
    with torch.no_grad():
        first = vt(img, *args)
        plan = vt._plan_cache[1]
        again = vt(img, *args)
        assert vt._plan_cache[1] is plan
        torch.testing.assert_close(first, again)
        moved = list(args)
        moved[-1] = rig["lidar_aug_matrix"].clone()
        moved[-1][:, 0, 3] += 3.0
        shifted = vt(img, *moved)
        assert vt._plan_cache[1] is not plan
        assert not torch.allclose(first, shifted)


def test_depth_image_keeps_the_nearest_point():
    vt = _small_lss(DepthLSSTransform, in_channels=8)
    rig = _rig(image_size=vt.image_size, seed=2)
    rig["lidar_aug_matrix"] = torch.eye(4)[None]
    rig["img_aug_matrix"] = torch.eye(4).expand(1, 6, 4, 4)
    # Two points on one ray of camera 0 (at 8 m and 12 m depth), one point behind camera 0.
    c2l = rig["camera2lidar"][0, 0].double()
    K = rig["camera_intrinsics"][0, 0, :3, :3].double()
    pix = torch.tensor([100.5, 30.5, 1.0], dtype=torch.float64)
    ray = torch.linalg.inv(K) @ pix
    pts = [c2l[:3, :3] @ (ray * d) + c2l[:3, 3] for d in (12.0, 8.0, -5.0)]
    points = [torch.cat([torch.stack(pts).float(), torch.zeros(3, 2)], 1)]
    depth = vt.depth_image(points, rig["lidar2image"], rig["img_aug_matrix"], rig["lidar_aug_matrix"])
    assert depth.shape == (1, 6, 1, 64, 176)
    assert depth[0, 0, 0, 30, 100].item() == pytest.approx(8.0, abs=1e-3)
    # Camera 0 sees one pixel: the far point lost, the one behind it was dropped (others may see them).
    assert (depth[0, 0] > 0).sum() == 1


def _official_depthlss():
    return DepthLSSTransform(in_channels=256, out_channels=80, image_size=[256, 704], feature_size=[32, 88],
                             xbound=[-54.0, 54.0, 0.3], ybound=[-54.0, 54.0, 0.3], zbound=[-10.0, 10.0, 20.0],
                             dbound=[1.0, 60.0, 0.5], downsample=2)


def _bn(prefix, c):
    return {f"{prefix}.{k}": (c,) for k in ("weight", "bias", "running_mean", "running_var")} | \
        {f"{prefix}.num_batches_tracked": ()}


def test_depthlss_keys_and_buffers_match_the_official_table():
    vt = _official_depthlss()
    exp = {"dx": (3,), "bx": (3,), "nx": (3,), "frustum": (118, 32, 88, 3),
           "dtransform.0.weight": (8, 1, 1, 1), "dtransform.0.bias": (8,), **_bn("dtransform.1", 8),
           "dtransform.3.weight": (32, 8, 5, 5), "dtransform.3.bias": (32,), **_bn("dtransform.4", 32),
           "dtransform.6.weight": (64, 32, 5, 5), "dtransform.6.bias": (64,), **_bn("dtransform.7", 64),
           "depthnet.0.weight": (256, 320, 3, 3), "depthnet.0.bias": (256,), **_bn("depthnet.1", 256),
           "depthnet.3.weight": (256, 256, 3, 3), "depthnet.3.bias": (256,), **_bn("depthnet.4", 256),
           "depthnet.6.weight": (198, 256, 1, 1), "depthnet.6.bias": (198,),
           "downsample.0.weight": (80, 80, 3, 3), **_bn("downsample.1", 80),
           "downsample.3.weight": (80, 80, 3, 3), **_bn("downsample.4", 80),
           "downsample.6.weight": (80, 80, 3, 3), **_bn("downsample.7", 80)}
    assert {k: tuple(v.shape) for k, v in vt.state_dict().items()} == exp
    torch.testing.assert_close(vt.dx, torch.tensor([0.3, 0.3, 20.0]))
    torch.testing.assert_close(vt.bx, torch.tensor([-53.85, -53.85, 0.0]))
    assert vt.nx.tolist() == [360, 360, 1] and vt.nx.dtype == torch.int64
    assert vt.downsample[3].stride == (2, 2)
    assert not any(p.requires_grad for p in (vt.dx, vt.bx, vt.nx, vt.frustum))


def test_lss_official_resolution_shapes():
    """Camera-only / seg LSS (0.4 m grid): [1, 6, 256, 32, 88] → [1, 80, 128, 128]."""
    vt = LSSTransform(in_channels=256, out_channels=80, image_size=[256, 704], feature_size=[32, 88],
                      xbound=[-51.2, 51.2, 0.4], ybound=[-51.2, 51.2, 0.4], zbound=[-10.0, 10.0, 20.0],
                      dbound=[1.0, 60.0, 0.5], downsample=2).eval()
    assert vt.depthnet.weight.shape == (198, 256, 1, 1)
    torch.testing.assert_close(vt.bx, torch.tensor([-51.0, -51.0, 0.0]))
    rig = _rig(image_size=(256, 704))
    with torch.no_grad():
        out = vt(torch.randn(1, 6, 256, 32, 88), None, None, None, rig["lidar2camera"], rig["lidar2image"],
                 rig["camera_intrinsics"], rig["camera2lidar"], rig["img_aug_matrix"], rig["lidar_aug_matrix"])
    assert out.shape == (1, 80, 128, 128) and torch.isfinite(out).all()
