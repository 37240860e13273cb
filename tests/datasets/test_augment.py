"""Augmentation and filter transforms: geometry stays consistent, filters match naive loops.

Samples are built here directly (random points, boxes, cameras, images); no dataset is needed.
"""
import numpy as np
import pytest
import torch
from PIL import Image

from bevfusion.config import load_config
from bevfusion.registry import Registry
from bevfusion.structures.boxes import box_corners, points_in_boxes_np, rotation_z
from bevfusion.structures.geometry import invert_transform, make_transform, transform_points
from bevfusion.datasets.transforms.augment import (
    GlobalRotScaleTrans, GridMask, ImageAug3D, ImageNormalize, ObjectNameFilter, ObjectRangeFilter,
    PointShuffle, PointsRangeFilter, RandomFlip3D)
from bevfusion.datasets.transforms.bev_seg import LoadBEVSegmentation
from bevfusion.datasets.transforms.object_paste import ObjectPaste

W, H = 1600, 900
TRAIN_IMG = dict(final_dim=[256, 704], resize_lim=[0.38, 0.55], bot_pct_lim=[0.0, 0.0], rot_lim=[-5.4, 5.4],
                 rand_flip=True, is_train=True)
TRAIN_3D = dict(resize_lim=[0.9, 1.1], rot_lim=[-0.78539816, 0.78539816], trans_lim=0.5, is_train=True)
CLASSES = ["car", "truck", "construction_vehicle", "bus", "trailer", "barrier", "motorcycle", "bicycle",
           "pedestrian", "traffic_cone"]


def _cameras(rng, n=6):
    """nuScenes-like rig: camera i looks along yaw 60°·i in the LiDAR frame (camera z forward, y down)."""
    K = np.array([[1266.0, 0, 816], [0, 1266, 491], [0, 0, 1]])
    intrinsics = np.tile(np.eye(4), (n, 1, 1))
    intrinsics[:, :3, :3] = K
    cam2lidar = []
    for i in range(n):
        yaw = np.deg2rad(60 * i) + rng.uniform(-0.05, 0.05)
        # columns: camera x (right), y (down), z (forward) expressed in the LiDAR frame
        fwd = np.array([np.cos(yaw), np.sin(yaw), 0.0])
        right = np.array([np.sin(yaw), -np.cos(yaw), 0.0])
        R = np.stack([right, [0, 0, -1.0], fwd], axis=1)
        cam2lidar.append(make_transform(R, [rng.uniform(-1, 1), rng.uniform(-1, 1), 1.5]))
    cam2lidar = np.stack(cam2lidar)
    lidar2cam = np.stack([invert_transform(T) for T in cam2lidar])
    return intrinsics, lidar2cam, intrinsics @ lidar2cam


def _boxes(rng, m):
    b = np.zeros((m, 9))
    b[:, 0:2] = rng.uniform(-40, 40, (m, 2))
    b[:, 2] = rng.uniform(-2, 1, m)
    b[:, 3:6] = rng.uniform(0.5, 5, (m, 3))
    b[:, 6] = rng.uniform(-np.pi, np.pi, m)
    b[:, 7:9] = rng.normal(0, 3, (m, 2))
    return b


def _sample(seed, n_cams=6, m=12, n_points=4000, images=True):
    rng = np.random.default_rng(seed)
    intrinsics, lidar2cam, lidar2image = _cameras(rng, n_cams)
    boxes = _boxes(rng, m)
    points = np.zeros((n_points, 5), np.float32)
    points[:, :3] = rng.uniform([-55, -55, -4], [55, 55, 4], (n_points, 3))
    points[:, 3] = rng.uniform(0, 255, n_points)
    # a few points inside every box, so "inside before ⇒ inside after" is tested on real members
    local = rng.uniform(-0.45, 0.45, (m, 20, 3)) * boxes[:, None, 3:6]
    c, s = np.cos(boxes[:, 6])[:, None], np.sin(boxes[:, 6])[:, None]
    inside = np.stack([local[..., 0] * c - local[..., 1] * s, local[..., 0] * s + local[..., 1] * c,
                       local[..., 2]], -1) + boxes[:, None, :3]
    extra = np.zeros((m * 20, 5), np.float32)
    extra[:, :3] = inside.reshape(-1, 3)
    results = {
        "points": np.concatenate([points, extra]),
        "gt_bboxes_3d": boxes,
        "gt_labels_3d": rng.integers(-1, 10, m).astype(np.int64),
        "gt_names": np.array([f"n{i}" for i in range(m)]),
        "camera_intrinsics": intrinsics,
        "lidar2camera": lidar2cam,
        "lidar2image": lidar2image,
        "lidar_aug_matrix": np.eye(4),
        "img_aug_matrix": np.tile(np.eye(4), (n_cams, 1, 1)),
        "rng": np.random.default_rng(seed + 1000),
    }
    if images:
        results["img"] = [Image.new("RGB", (W, H)) for _ in range(n_cams)]
        results["ori_shape"] = (W, H)
    return results


def _project(lidar2image, pts):
    """(N, 3) LiDAR points → (N, 2) pixels and depth."""
    p = pts @ lidar2image[:3, :3].T + lidar2image[:3, 3]
    return p[:, :2] / p[:, 2:3], p[:, 2]


def _apply_img_aug(M, uv):
    return uv @ M[:2, :2].T + M[:2, 3]


# ---------------------------------------------------------------------------------------------------
# Constructor keys are the official ones


def test_official_pipeline_keys_build():
    cfg = load_config("configs/nuscenes/default.yaml")
    table = {"ImageAug3D": ImageAug3D, "GlobalRotScaleTrans": GlobalRotScaleTrans, "RandomFlip3D": RandomFlip3D,
             "PointsRangeFilter": PointsRangeFilter, "ObjectRangeFilter": ObjectRangeFilter,
             "ObjectNameFilter": ObjectNameFilter, "PointShuffle": PointShuffle, "ImageNormalize": ImageNormalize,
             "GridMask": GridMask, "ObjectPaste": ObjectPaste, "LoadBEVSegmentation": LoadBEVSegmentation}
    reg = Registry("transform", table)
    built = 0
    for name in ("train_pipeline", "test_pipeline"):
        for i, t in enumerate(cfg[name]):
            if t["type"] in table:
                assert reg.build(dict(t), f"{name}[{i}]") is not None
                built += 1
    assert built == 11 + 5  # the database and maps are read on first use, not here


# ---------------------------------------------------------------------------------------------------
# ImageAug3D


def test_image_aug_test_mode_matches_official_numbers():
    r = _sample(0, n_cams=2)
    out = ImageAug3D([256, 704], [0.48, 0.48], [0.0, 0.0], [0.0, 0.0], False, False)(r)
    assert [im.size for im in out["img"]] == [(704, 256)] * 2
    expected = np.eye(4)
    expected[0, 0] = expected[1, 1] = 0.48
    expected[:2, 3] = [-32, -176]  # crop (32, 176, 736, 432) of the 768×432 resize
    np.testing.assert_allclose(out["img_aug_matrix"], np.stack([expected] * 2), atol=1e-12)


def test_image_aug_composes_with_existing_matrix():
    r = _sample(1, n_cams=2)
    prev = np.tile(np.eye(4), (2, 1, 1))
    prev[:, 0, 3] = 7.0
    r["img_aug_matrix"] = prev.copy()
    aug = ImageAug3D([256, 704], [0.48, 0.48], [0.0, 0.0], [0.0, 0.0], False, False)
    out = aug(r)
    single = aug.aug_matrix((W, H), (768, 432), (32, 176, 736, 432), False, 0.0)
    np.testing.assert_allclose(out["img_aug_matrix"], single[None] @ prev, atol=1e-12)


def _marker_centroid(arr, channel):
    """Intensity-weighted centre of one colour channel, in continuous pixel coordinates."""
    a = arr[..., channel].astype(np.float64)
    a = np.where(a > 40, a, 0)
    if a.sum() < 255 * 2:
        return None
    v, u = np.mgrid[:a.shape[0], :a.shape[1]]
    return np.array([((u + 0.5) * a).sum(), ((v + 0.5) * a).sum()]) / a.sum()


@pytest.mark.parametrize("seed", range(6))
def test_image_aug_matrix_matches_painted_markers(seed):
    """Project 3D points, paint them into the original image, find them in the augmented image."""
    r = _sample(seed, n_cams=6)
    rng = np.random.default_rng(seed)
    originals = []
    for i in range(6):
        img = np.zeros((H, W, 3), np.uint8)
        cam_markers = []
        for ch in range(3):
            # a 3D point in front of camera i that lands inside the region every crop keeps
            uv_target = np.array([rng.uniform(400, 1200), rng.uniform(560, 840)])
            depth = rng.uniform(5, 30)
            K = r["camera_intrinsics"][i, :3, :3]
            p_cam = np.linalg.solve(K, np.array([*uv_target, 1.0])) * depth
            p_lidar = transform_points(np.linalg.inv(r["lidar2camera"][i]), p_cam[None])[0]
            uv, _ = _project(r["lidar2image"][i], p_lidar[None])
            u0, v0 = np.floor(uv[0]).astype(int)
            img[v0 - 5:v0 + 6, u0 - 5:u0 + 6, ch] = 255  # 11×11 square centred on pixel (u0, v0)
            cam_markers.append(np.array([u0 + 0.5, v0 + 0.5]))
        r["img"][i] = Image.fromarray(img)
        originals.append(cam_markers)
    out = ImageAug3D(**TRAIN_IMG)(r)
    mats = out["img_aug_matrix"]
    assert len({tuple(np.round(m[:2].ravel(), 6)) for m in mats}) == 6  # independent per camera
    checked = 0
    for i in range(6):
        arr = np.asarray(out["img"][i])
        assert arr.shape == (256, 704, 3)
        for ch in range(3):
            expected = _apply_img_aug(mats[i], originals[i][ch][None])[0]
            if not (12 < expected[0] < 704 - 12 and 12 < expected[1] < 256 - 12):
                continue
            found = _marker_centroid(arr, ch)
            assert found is not None, (seed, i, ch, expected)
            assert np.linalg.norm(found - expected) < 1.0, (seed, i, ch, found, expected)
            checked += 1
    assert checked >= 6


def test_image_aug_pads_when_resized_narrower_than_crop():
    r = _sample(3, n_cams=1)
    r["img"] = [Image.new("RGB", (W, H), (200, 100, 50))]
    out = ImageAug3D([256, 704], [0.4, 0.4], [0.0, 0.0], [0.0, 0.0], False, True)(r)
    arr = np.asarray(out["img"][0])
    assert arr.shape == (256, 704, 3)
    assert (arr[:, 640:] == 0).all() and (arr[:, :630] == (200, 100, 50)).all()  # 1600·0.4 = 640 columns


# ---------------------------------------------------------------------------------------------------
# GlobalRotScaleTrans + RandomFlip3D (+ ImageAug3D): one geometry


def _match_corner_sets(a, b):
    """Max over a's corners of the distance to the nearest corner in b (per box, (M, 8, k))."""
    d = np.linalg.norm(a[:, :, None, :] - b[:, None, :, :], axis=-1)
    return d.min(-1).max()


@pytest.mark.parametrize("seed", range(40))
def test_lidar_augmentations_keep_points_boxes_and_cameras_consistent(seed):
    r = _sample(seed, n_cams=6, images=False)
    r["img"] = [Image.new("RGB", (W // 8, H // 8)) for _ in range(6)]  # small: only matrices matter here
    boxes0, points0 = r["gt_bboxes_3d"].copy(), r["points"].copy()
    inside0 = points_in_boxes_np(points0[:, :3], boxes0, eps=-0.01)  # safely inside
    r = ImageAug3D(**TRAIN_IMG)(r)
    r = GlobalRotScaleTrans(**TRAIN_3D)(r)
    r["gt_masks_bev"] = np.zeros((6, 200, 200), np.uint8)
    r = RandomFlip3D()(r)
    T = r["lidar_aug_matrix"]
    boxes1, points1 = r["gt_bboxes_3d"], r["points"]
    s = np.cbrt(abs(np.linalg.det(T[:3, :3])))
    assert 0.9 - 1e-9 <= s <= 1.1 + 1e-9
    # p_aug = lidar_aug_matrix @ p, for points (float32 storage) and box centres
    np.testing.assert_allclose(points1[:, :3], transform_points(T, points0[:, :3].astype(np.float64)),
                               atol=1e-3)
    np.testing.assert_array_equal(points1[:, 3:], points0[:, 3:])
    np.testing.assert_allclose(boxes1[:, :3], transform_points(T, boxes0[:, :3]), atol=1e-9)
    np.testing.assert_allclose(boxes1[:, 3:6], boxes0[:, 3:6] * s, rtol=1e-9)
    # velocity transforms with the linear part
    np.testing.assert_allclose(boxes1[:, 7:9], boxes0[:, 7:9] @ T[:2, :2].T, atol=1e-9)
    # the corners of each augmented box are the transformed corners of the original box (as a set)
    c0 = box_corners(boxes0)
    c1 = box_corners(boxes1)
    c0t = transform_points(T, c0.reshape(-1, 3)).reshape(c0.shape)
    assert _match_corner_sets(c1, c0t) < 1e-6
    # points inside a box before are inside the same box after
    inside1 = points_in_boxes_np(points1[:, :3], boxes1, eps=1e-3)
    assert (inside1 | ~inside0).all()
    # the same 3D corner seen by the augmented camera model lands where the original projection,
    # moved by img_aug_matrix, lands
    T_inv = np.linalg.inv(T)
    for i in range(6):
        l2i, M = r["lidar2image"][i], r["img_aug_matrix"][i]
        uv0, d0 = _project(l2i, c0.reshape(-1, 3))
        uv1, d1 = _project(l2i @ T_inv, c0t.reshape(-1, 3))
        front = d0 > 0.5
        np.testing.assert_allclose(d1, d0, rtol=1e-9, atol=1e-9)
        np.testing.assert_allclose(_apply_img_aug(M, uv1[front]), _apply_img_aug(M, uv0[front]), atol=1e-3)


def test_global_rot_scale_trans_test_mode_and_direction():
    r = _sample(0, images=False)
    before = {k: np.copy(r[k]) for k in ("points", "gt_bboxes_3d")}
    out = GlobalRotScaleTrans([1.0, 1.0], [0.0, 0.0], 0.0, False)(r)
    np.testing.assert_array_equal(out["points"], before["points"])
    np.testing.assert_array_equal(out["gt_bboxes_3d"], before["gt_bboxes_3d"])
    np.testing.assert_array_equal(out["lidar_aug_matrix"], np.eye(4))
    # a fixed angle θ turns the scene clockwise (upstream's box rotate(θ)): +x goes to (cos θ, -sin θ)
    r = _sample(0, images=False)
    r["points"] = np.array([[10.0, 0, 0, 1, 0]], np.float32)
    r["gt_bboxes_3d"] = np.array([[10.0, 0, 0, 4, 2, 1.5, 0.0, 1.0, 0.0]])
    out = GlobalRotScaleTrans([1.0, 1.0], [0.3, 0.3], 0.0, True)(r)
    np.testing.assert_allclose(out["points"][0, :2], [10 * np.cos(0.3), -10 * np.sin(0.3)], atol=1e-5)
    np.testing.assert_allclose(out["gt_bboxes_3d"][0, 6], -0.3, atol=1e-12)
    np.testing.assert_allclose(out["lidar_aug_matrix"][:3, :3], rotation_z(-0.3), atol=1e-12)


def test_random_flip_masks_follow_lidar_aug_matrix():
    """A BEV cell marked before the flip is found at lidar_aug_matrix @ (its centre) after it."""
    rng = np.random.default_rng(5)
    xs = -50 + 0.5 * (np.arange(200) + 0.5)
    for flip_y in (False, True):
        for flip_x in (False, True):
            masks = (rng.random((6, 200, 200)) < 0.1).astype(np.uint8)
            r = {"points": np.zeros((0, 5), np.float32), "gt_bboxes_3d": np.zeros((0, 9)),
                 "gt_masks_bev": masks.copy(), "lidar_aug_matrix": np.eye(4)}
            out = RandomFlip3D.apply(r, flip_y, flip_x)
            T = out["lidar_aug_matrix"]
            c, ix, iy = np.nonzero(masks)
            p = np.stack([xs[ix], xs[iy], np.zeros_like(ix, dtype=float)], 1)
            q = transform_points(T, p)
            jx = np.floor((q[:, 0] + 50) / 0.5).astype(int)
            jy = np.floor((q[:, 1] + 50) / 0.5).astype(int)
            assert out["gt_masks_bev"][c, jx, jy].all()
            assert out["gt_masks_bev"].sum() == masks.sum()


def test_random_flip_draws_both_axes_independently():
    seen = set()
    for seed in range(40):
        r = {"points": np.zeros((1, 5), np.float32), "gt_bboxes_3d": np.zeros((0, 9)),
             "lidar_aug_matrix": np.eye(4), "rng": np.random.default_rng(seed)}
        T = RandomFlip3D()(r)["lidar_aug_matrix"]
        seen.add((T[0, 0], T[1, 1]))
    assert seen == {(1, 1), (1, -1), (-1, 1), (-1, -1)}


# ---------------------------------------------------------------------------------------------------
# Filters


def test_points_range_filter_matches_naive_loop():
    rng = np.random.default_rng(0)
    pcr = [-51.2, -51.2, -5.0, 51.2, 51.2, 3.0]
    pts = rng.uniform(-60, 60, (3000, 5)).astype(np.float32)
    pts[:10, 0] = 51.2  # on the boundary: dropped (strict)
    pts[10:20, 2] = np.float32(-5.0)
    out = PointsRangeFilter(pcr)({"points": pts.copy()})["points"]
    expected = [p for p in pts if all(pcr[k] < p[k] < pcr[k + 3] for k in range(3))]
    np.testing.assert_array_equal(out, np.array(expected).reshape(-1, 5))


def test_object_range_and_name_filters_match_naive_loops():
    rng = np.random.default_rng(1)
    pcr = [-51.2, -51.2, -5.0, 51.2, 51.2, 3.0]
    boxes = _boxes(rng, 300)
    boxes[:, :2] = rng.uniform(-60, 60, (300, 2))
    boxes[:5, 0] = -51.2
    boxes[:, 6] = rng.uniform(-10, 10, 300)
    labels = rng.integers(-1, 12, 300)
    names = np.array([f"n{i}" for i in range(300)])
    r = {"gt_bboxes_3d": boxes.copy(), "gt_labels_3d": labels.copy(), "gt_names": names.copy()}
    r = ObjectRangeFilter(pcr)(r)
    r = ObjectNameFilter(CLASSES)(r)
    keep = [i for i in range(300) if pcr[0] < boxes[i, 0] < pcr[3] and pcr[1] < boxes[i, 1] < pcr[4]
            and 0 <= labels[i] < 10]
    np.testing.assert_array_equal(r["gt_names"], names[keep])
    np.testing.assert_array_equal(r["gt_labels_3d"], labels[keep])
    np.testing.assert_allclose(r["gt_bboxes_3d"][:, :6], boxes[keep, :6])
    yaw = r["gt_bboxes_3d"][:, 6]
    assert ((yaw >= -np.pi) & (yaw < np.pi)).all()
    np.testing.assert_allclose(np.cos(yaw), np.cos(boxes[keep, 6]), atol=1e-9)
    np.testing.assert_allclose(np.sin(yaw), np.sin(boxes[keep, 6]), atol=1e-9)


def test_point_shuffle_is_a_permutation():
    pts = np.random.default_rng(0).random((500, 5)).astype(np.float32)
    out = PointShuffle()({"points": pts.copy(), "rng": np.random.default_rng(3)})["points"]
    assert not np.array_equal(out, pts)
    np.testing.assert_array_equal(out[np.lexsort(out.T)], pts[np.lexsort(pts.T)])


# ---------------------------------------------------------------------------------------------------
# ImageNormalize and GridMask


def test_image_normalize_matches_manual_formula():
    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 256, (8, 12, 3), dtype=np.uint8) for _ in range(6)]
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    out = ImageNormalize(mean, std)({"img": [Image.fromarray(a) for a in arrays]})["img"]
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32 and out.shape == (6, 3, 8, 12)
    for n in range(6):
        for c in range(3):
            for y in (0, 7):
                for x in (0, 5, 11):
                    assert out[n, c, y, x].item() == pytest.approx((arrays[n][y, x, c] / 255 - mean[c]) / std[c],
                                                                   abs=1e-6)


def _naive_grid(h, w, d, length, st_h, st_w, use_h, use_w):
    hh, ww = int(1.5 * h), int(1.5 * w)
    big = np.ones((hh, ww))
    for y in range(hh):
        for x in range(ww):
            in_h = use_h and y >= st_h and (y - st_h) % d < length and (y - st_h) // d < hh // d
            in_w = use_w and x >= st_w and (x - st_w) % d < length and (x - st_w) // d < ww // d
            if in_h or in_w:
                big[y, x] = 0
    return big[(hh - h) // 2:(hh - h) // 2 + h, (ww - w) // 2:(ww - w) // 2 + w]


@pytest.mark.parametrize("mode", [0, 1])
def test_grid_mask_matches_naive_grid_and_expected_fraction(mode):
    gm = GridMask(use_h=True, use_w=True, max_epoch=10, rotate=1, ratio=0.5, mode=mode, prob=1.0)
    rng = np.random.default_rng(0)
    fractions, expected = [], []
    for k in range(30):
        h, w = 24, 40
        mask, p = gm.make_mask(h, w, rng)
        ref = _naive_grid(h, w, p["d"], p["l"], p["st_h"], p["st_w"], True, True)
        np.testing.assert_array_equal(mask, ref if mode == 0 else 1 - ref)
    # on a large canvas the masked fraction is 1 - (1 - l/d)² (mode 0) or (1 - l/d)² (mode 1)
    for k in range(20):
        mask, p = gm.make_mask(256, 704, rng)
        keep = (1 - p["l"] / p["d"]) ** 2
        fractions.append(1 - mask.mean())
        expected.append(1 - keep if mode == 0 else keep)
    fractions, expected = np.array(fractions), np.array(expected)
    assert np.abs(fractions - expected).mean() < 0.04


def test_grid_mask_on_normalised_tensor_uses_image_height_and_width():
    imgs = torch.ones(6, 3, 64, 176)
    gm = GridMask(use_h=True, use_w=False, max_epoch=10, rotate=1, ratio=0.5, mode=0, prob=1.0)
    out = gm({"img": imgs.clone(), "rng": np.random.default_rng(4)})["img"]
    assert out.shape == (6, 3, 64, 176)
    # the same horizontal stripes in every camera and channel, whole rows zeroed
    rows = out[0, 0, :, 0]
    assert torch.equal(out, rows.view(1, 1, 64, 1).expand_as(out))
    assert 0 < (rows == 0).sum() < 64


def test_grid_mask_probability_and_epoch():
    imgs = torch.ones(6, 3, 16, 32)
    gm = GridMask(True, True, max_epoch=20, prob=0.0, fixed_prob=True)
    assert torch.equal(gm({"img": imgs.clone(), "rng": np.random.default_rng(0)})["img"], imgs)
    gm = GridMask(True, True, max_epoch=20, prob=0.8, fixed_prob=False)
    gm.set_epoch(5)
    assert gm.prob == pytest.approx(0.2)
    gm.set_epoch(0)
    assert torch.equal(gm({"img": imgs.clone(), "rng": np.random.default_rng(0)})["img"], imgs)
    gm.set_epoch(20)  # prob 0.8
    changed = sum(not torch.equal(gm({"img": imgs.clone(), "rng": np.random.default_rng(s)})["img"], imgs)
                  for s in range(100))
    assert 65 <= changed <= 95


def test_empty_scene_passes_every_transform():
    r = _sample(2, n_cams=2, m=0, n_points=0)
    pcr = [-51.2, -51.2, -5.0, 51.2, 51.2, 3.0]
    for t in (ImageAug3D(**TRAIN_IMG), GlobalRotScaleTrans(**TRAIN_3D), RandomFlip3D(), PointsRangeFilter(pcr),
              ObjectRangeFilter(pcr), ObjectNameFilter(CLASSES), ImageNormalize([0.5] * 3, [0.2] * 3),
              GridMask(True, True, 20, prob=1.0), PointShuffle()):
        r = t(r)
    assert r["points"].shape == (0, 5) and r["gt_bboxes_3d"].shape == (0, 9) and r["gt_labels_3d"].shape == (0,)
    assert r["img"].shape == (2, 3, 256, 704)
