"""Info files and the GT database written from the synthetic drive, checked against the devkit."""
from __future__ import annotations

import colorsys

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("nuscenes")
from nuscenes.utils.geometry_utils import points_in_box  # noqa: E402

from bevfusion.data.synthetic import CLASS_HUES, CLASS_NAMES  # noqa: E402
from bevfusion.datasets.converters.nuscenes import CAMERA_NAMES  # noqa: E402
from bevfusion.datasets.nuscenes import NuScenesDataset  # noqa: E402
from bevfusion.structures.boxes import box_corners, official_to_internal, points_in_boxes_np  # noqa: E402
from bevfusion.structures.geometry import invert_transform, make_transform  # noqa: E402
from bevfusion.utils.io import load_pickle  # noqa: E402


def test_official_fields_and_dtypes(converted):
    _, _, written, _, _ = converted
    data = load_pickle(written["train"])
    assert data["metadata"] == {"version": "v1.0-mini"}
    val = load_pickle(written["val"])["infos"]
    assert len(data["infos"]) > 0 and len(val) > 0
    info = data["infos"][0]
    for key in ("lidar_path", "token", "sweeps", "cams", "lidar2ego_translation", "lidar2ego_rotation",
                "ego2global_translation", "ego2global_rotation", "timestamp", "location", "gt_boxes", "gt_names",
                "gt_velocity", "num_lidar_pts", "num_radar_pts", "valid_flag"):
        assert key in info, key
    assert list(info["cams"]) == list(CAMERA_NAMES)
    m = len(info["gt_boxes"])
    assert info["gt_boxes"].dtype == np.float64 and info["gt_boxes"].shape == (m, 7)
    assert info["gt_velocity"].shape == (m, 2) and info["gt_names"].shape == (m,)
    assert info["valid_flag"].dtype == bool and len(info["lidar2ego_rotation"]) == 4
    assert isinstance(info["timestamp"], int) and info["location"] in {"boston-seaport", "singapore-onenorth",
                                                                       "singapore-hollandvillage",
                                                                       "singapore-queenstown"}
    cam = info["cams"]["CAM_FRONT"]
    assert cam["camera_intrinsics"].shape == (3, 3) and cam["sensor2lidar_rotation"].shape == (3, 3)
    assert cam["sensor2lidar_translation"].shape == (3,) and cam["type"] == "CAM_FRONT"
    assert 0 < len(info["sweeps"]) <= 10 and all(s["type"] == "lidar" for s in info["sweeps"])
    assert all(a["timestamp"] > b["timestamp"] for a, b in zip(info["sweeps"], info["sweeps"][1:]))  # newest first
    names = set(np.concatenate([i["gt_names"] for i in data["infos"] + val]))
    assert set(CLASS_NAMES) <= names


def test_boxes_match_the_devkit_and_contain_their_points(converted):
    _, _, written, _, nusc = converted
    checked = 0
    for info in load_pickle(written["val"])["infos"][:4]:
        sample = nusc.get("sample", info["token"])
        _, dev_boxes, _ = nusc.get_sample_data(sample["data"]["LIDAR_TOP"])  # independent: devkit's own chain
        ours = official_to_internal(info["gt_boxes"])
        for b, dev in zip(ours, dev_boxes):
            d = np.linalg.norm(box_corners(b[None])[0][:, None] - dev.corners().T[None], axis=-1)
            assert d.min(axis=1).max() < 1e-6
        points = np.fromfile(info["lidar_path"], dtype=np.float32).reshape(-1, 5)
        inside = points_in_boxes_np(points, ours)
        # Ray-cast hits lie on the box faces: a 5 cm margin takes in those that noise pushed outward.
        near = points_in_boxes_np(points, ours, eps=0.05)
        for j, n in enumerate(info["num_lidar_pts"]):
            dev_count = int(points_in_box(dev_boxes[j], points[:, :3].T).sum())
            assert inside[:, j].sum() == dev_count
            if n >= 5:
                assert near[:, j].sum() >= 0.8 * n  # the keyframe sees most of what the annotation counts
                checked += 1
    assert checked > 10


def _hue(rgb):
    h, s, v = colorsys.rgb_to_hsv(*(np.asarray(rgb, dtype=np.float64) / 255.0))
    return h * 360.0, s, v


def test_boxes_project_onto_their_rendered_objects(converted):
    _, _, written, _, _ = converted
    hits = misses = 0
    for info in load_pickle(written["val"])["infos"]:
        boxes = official_to_internal(info["gt_boxes"])
        for cam_name, cam in info["cams"].items():
            lidar2cam = invert_transform(make_transform(cam["sensor2lidar_rotation"], cam["sensor2lidar_translation"]))
            img = np.asarray(Image.open(cam["data_path"]).convert("RGB"))
            H, W = img.shape[:2]
            for b, name, n in zip(boxes, info["gt_names"], info["num_lidar_pts"]):
                if n < 20 or name not in CLASS_NAMES:
                    continue
                c = lidar2cam[:3, :3] @ b[:3] + lidar2cam[:3, 3]
                if c[2] < 2.0:
                    continue
                u, v, _ = cam["camera_intrinsics"] @ (c / c[2])
                if not (5 <= u < W - 5 and 5 <= v < H - 5):
                    continue
                h, s, _ = _hue(img[int(v), int(u)])
                want = CLASS_HUES[CLASS_NAMES.index(name)]
                if s > 0.3 and min(abs(h - want), 360 - abs(h - want)) < 20:
                    hits += 1
                else:
                    misses += 1  # occluded by another object, or the centre falls on a window/texture
    assert hits >= 10 and hits >= 3 * misses


def test_sweep_transforms_follow_the_ego_poses(converted):
    _, _, written, _, nusc = converted
    info = load_pickle(written["train"])["infos"][5]
    sd = nusc.get("sample_data", nusc.get("sample", info["token"])["data"]["LIDAR_TOP"])

    def sensor2global(record):
        cs = nusc.get("calibrated_sensor", record["calibrated_sensor_token"])
        pose = nusc.get("ego_pose", record["ego_pose_token"])
        return make_transform(pose["rotation"], pose["translation"]) @ make_transform(cs["rotation"],
                                                                                      cs["translation"])

    key = sensor2global(sd)
    moved = 0.0
    for sweep in info["sweeps"]:
        expected = np.linalg.inv(key) @ sensor2global(nusc.get("sample_data", sweep["sample_data_token"]))
        np.testing.assert_allclose(sweep["sensor2lidar_rotation"], expected[:3, :3], atol=1e-9)
        np.testing.assert_allclose(sweep["sensor2lidar_translation"], expected[:3, 3], atol=1e-9)
        moved = max(moved, np.linalg.norm(expected[:3, 3]))
    assert moved > 0.5  # the ego really moves between sweeps, so compensation matters


def test_gt_database_objects_lie_in_their_boxes(converted):
    _, out, _, db_path, _ = converted
    db = load_pickle(db_path)
    assert set(db) <= set(CLASS_NAMES) and sum(len(v) for v in db.values()) > 0
    for name, entries in db.items():
        for e in entries[:5]:
            pts = np.fromfile(out / e["path"], dtype=np.float32).reshape(-1, 5)
            assert len(pts) == e["num_points_in_gt"] and e["box3d_lidar"].shape == (9,)
            box = official_to_internal(e["box3d_lidar"][None].astype(np.float64))[0].copy()
            box[:3] = 0.0  # points are stored relative to the box centre
            assert points_in_boxes_np(pts, box[None], eps=1e-4).all()


def test_dataset_reads_converted_infos(converted):
    root, _, written, _, _ = converted
    ds = NuScenesDataset(root, written["val"], pipeline=[{"type": "LoadPointsFromFile"},
                                                         {"type": "LoadAnnotations3D"}], test_mode=True)
    sample = ds[0]
    assert sample["points"].shape[1] == 5 and sample["gt_bboxes_3d"].shape[1] == 9


def test_points_of_each_box_equal_the_dense_membership():
    """The GT database's per-box point lists equal the columns of the dense float64 membership
    (`points_in_boxes_np`), with overlapping boxes, an empty box and points on faces."""
    from bevfusion.datasets.converters.nuscenes import _points_of_each_box

    rng = np.random.default_rng(4)
    boxes = np.array([[0, 0, 0, 4, 2, 1.5, 0.3, 0, 0], [1, 0.5, 0, 3, 3, 2, -0.8, 0, 0],  # these two overlap
                      [30, 30, 0, 1, 1, 1, 0, 0, 0],                                      # holds no point
                      [-5, 2, 0.5, 0.7, 0.7, 1.8, 1.2, 0, 0]])
    points = np.concatenate([rng.uniform(-8, 8, (4000, 3)) * [1, 1, 0.3], rng.normal(0, 1, (4000, 2))], axis=1)
    points[:4, :3] = [[2, 0, 0], [0, 1, 0], [0, 0, 0.75], [-2, -1, -0.75]]  # on faces of box 4
    boxes = np.concatenate([boxes, [[0, 0, 0, 4, 2, 1.5, 0, 0, 0]]])
    dense = points_in_boxes_np(points[:, :3], boxes)
    groups = _points_of_each_box(points, boxes)
    assert len(groups) == len(boxes)
    for i, idx in enumerate(groups):
        np.testing.assert_array_equal(idx, np.flatnonzero(dense[:, i]))
    assert len(groups[2]) == 0 and np.intersect1d(groups[0], groups[1]).size > 0 and set(range(4)) <= set(groups[4])
