"""The synthetic drive against independent references: nuscenes-devkit and plain geometry.

Most tests share the session fixture `synthetic_root` (10 mini scenes x 2 samples, small images).
"""
from __future__ import annotations

import colorsys
import json
import os
from pathlib import Path

import numpy as np
import pytest

nuscenes = pytest.importorskip("nuscenes")

from nuscenes import NuScenes  # noqa: E402
from nuscenes.eval.detection.config import config_factory  # noqa: E402
from nuscenes.eval.detection.evaluate import DetectionEval  # noqa: E402
from nuscenes.eval.detection.utils import category_to_detection_name  # noqa: E402
from nuscenes.map_expansion.map_api import NuScenesMap  # noqa: E402
from nuscenes.utils.data_classes import Box  # noqa: E402
from nuscenes.utils.geometry_utils import BoxVisibility, points_in_box, view_points  # noqa: E402
from nuscenes.utils.splits import create_splits_scenes  # noqa: E402
from PIL import Image  # noqa: E402
from pyquaternion import Quaternion  # noqa: E402

from bevfusion.data.synthetic import CAMERA_NAMES, CLASS_HUES, CLASS_NAMES, MAP_NAMES, generate  # noqa: E402

DETECTION_CLASSES = set(CLASS_NAMES)


@pytest.fixture(scope="module")
def nusc(synthetic_root):
    return NuScenes("v1.0-mini", str(synthetic_root), verbose=False)


def _val_samples(nusc):
    val = set(create_splits_scenes()["mini_val"])
    return [s for s in nusc.sample if nusc.get("scene", s["scene_token"])["name"] in val]


def _sensor_to_global(nusc, sd_token: str) -> np.ndarray:
    sd = nusc.get("sample_data", sd_token)
    cs = nusc.get("calibrated_sensor", sd["calibrated_sensor_token"])
    pose = nusc.get("ego_pose", sd["ego_pose_token"])
    s2e = Quaternion(cs["rotation"]).transformation_matrix
    s2e[:3, 3] = cs["translation"]
    e2g = Quaternion(pose["rotation"]).transformation_matrix
    e2g[:3, 3] = pose["translation"]
    return e2g @ s2e


def _load_points(nusc, sd_token: str) -> np.ndarray:
    path = nusc.get_sample_data_path(sd_token)
    return np.fromfile(path, dtype=np.float32).reshape(-1, 5)


def _to_global(nusc, sd_token: str, pts: np.ndarray) -> np.ndarray:
    t = _sensor_to_global(nusc, sd_token)
    return pts[:, :3].astype(np.float64) @ t[:3, :3].T + t[:3, 3]


def _box(ann: dict) -> Box:
    return Box(ann["translation"], ann["size"], Quaternion(ann["rotation"]))


# ---- layout and tables -----------------------------------------------------------------------------
def test_devkit_loads_mini_layout(nusc, synthetic_root):
    splits = create_splits_scenes()
    names = sorted(s["name"] for s in nusc.scene)
    assert names == sorted(splits["mini_train"] + splits["mini_val"])
    assert len(nusc.sample) == 20
    assert {m["filename"] for m in nusc.map} and all((synthetic_root / m["filename"]).is_file() for m in nusc.map)
    assert {log["location"] for log in nusc.log} <= set(MAP_NAMES)
    assert "synthetic" in (synthetic_root / "README.txt").read_text().lower()
    for sample in nusc.sample:
        assert set(sample["data"]) == {"LIDAR_TOP", *CAMERA_NAMES}
        for ch, token in sample["data"].items():
            sd = nusc.get("sample_data", token)
            assert sd["is_key_frame"] and 0 <= sd["timestamp"] - sample["timestamp"] < 50_000
            if ch != "LIDAR_TOP":  # cameras fire after the LiDAR keyframe: their own ego pose
                pose = nusc.get("ego_pose", sd["ego_pose_token"])
                assert pose["timestamp"] == sd["timestamp"]
            assert os.path.isfile(nusc.get_sample_data_path(token))
        # 9 LiDAR sweeps precede every keyframe, 50 ms apart, each with its own ego pose.
        sd = nusc.get("sample_data", sample["data"]["LIDAR_TOP"])
        chain = []
        while sd["prev"] and len(chain) < 9:
            prev = nusc.get("sample_data", sd["prev"])
            assert prev["next"] == sd["token"]
            assert sd["timestamp"] - prev["timestamp"] == 50_000
            chain.append(prev)
            sd = prev
        assert len(chain) == 9
        assert not chain[0]["is_key_frame"] and chain[0]["filename"].startswith("sweeps/LIDAR_TOP/")
        poses = [nusc.get("ego_pose", c["ego_pose_token"]) for c in chain]
        assert len({tuple(p["translation"]) for p in poses}) == 9
        assert len({tuple(p["rotation"]) for p in poses}) == 9  # the ego sways: its heading changes too
        speeds = [np.linalg.norm(np.subtract(a["translation"], b["translation"])) / 0.05
                  for a, b in zip(poses, poses[1:])]
        assert 4.0 < min(speeds) and max(speeds) < 14.0  # urban speeds
    for inst in nusc.instance:  # complete annotation chains, so every box has a velocity
        ann = nusc.get("sample_annotation", inst["first_annotation_token"])
        n = 1
        while ann["next"]:
            ann = nusc.get("sample_annotation", ann["next"])
            n += 1
        assert n == inst["nbr_annotations"] and ann["token"] == inst["last_annotation_token"]


def test_point_files_and_images(nusc):
    sample = nusc.sample[0]
    pts = _load_points(nusc, sample["data"]["LIDAR_TOP"])
    assert len(pts) > 5000
    assert set(np.unique(pts[:, 4]).astype(int)) <= set(range(32)) and pts[:, 4].max() > 20
    r = np.linalg.norm(pts[:, :3], axis=1)
    assert r.min() >= 0.9 and r.max() <= 70.5
    for ch in CAMERA_NAMES:
        sd = nusc.get("sample_data", sample["data"][ch])
        cs = nusc.get("calibrated_sensor", sd["calibrated_sensor_token"])
        with Image.open(nusc.get_sample_data_path(sd["token"])) as im:
            assert im.size == (sd["width"], sd["height"]) == (400, 225) and im.format == "JPEG"
        k = np.array(cs["camera_intrinsic"])
        # Intrinsics scaled from the 1600x900 rig: principal point near the centre, focal ~ 1/4.
        assert abs(k[0, 2] - 200) < 20 and abs(k[1, 2] - 112.5) < 15 and 190 < k[0, 0] < 330


def test_map_masks_around_ego(nusc, synthetic_root):
    maps = {}
    for scene in nusc.scene:
        sample = nusc.get("sample", scene["first_sample_token"])
        location = nusc.get("log", scene["log_token"])["location"]
        m = maps.setdefault(location, NuScenesMap(str(synthetic_root), location))
        pose = nusc.get("ego_pose", nusc.get("sample_data", sample["data"]["LIDAR_TOP"])["ego_pose_token"])
        x, y = pose["translation"][:2]
        yaw = Quaternion(pose["rotation"]).yaw_pitch_roll[0]
        layers = ["drivable_area", "ped_crossing", "walkway", "stop_line", "carpark_area", "road_divider",
                  "lane_divider"]
        mask = m.get_map_mask((x, y, 100, 100), np.rad2deg(yaw), layers, (200, 200))
        per_class = dict(zip(layers, mask.reshape(len(layers), -1).sum(1)))
        per_class["divider"] = per_class.pop("road_divider") + per_class.pop("lane_divider")
        assert all(v > 0 for v in per_class.values()), (scene["name"], per_class)
        assert mask[0, 100, 100] == 1  # the ego stands on the drivable area
    for name in MAP_NAMES:  # every official map loads (BEVFusion loads all four)
        maps.setdefault(name, NuScenesMap(str(synthetic_root), name))


# ---- detection evaluation --------------------------------------------------------------------------
def test_detection_eval_on_ground_truth(nusc, tmp_path):
    attribute = {a["token"]: a["name"] for a in nusc.attribute}
    results, present = {}, set()
    for sample in _val_samples(nusc):
        boxes = []
        for token in sample["anns"]:
            ann = nusc.get("sample_annotation", token)
            name = category_to_detection_name(ann["category_name"])
            if name is None or ann["num_lidar_pts"] + ann["num_radar_pts"] == 0:
                continue
            present.add(name)
            boxes.append({
                "sample_token": sample["token"], "translation": ann["translation"], "size": ann["size"],
                "rotation": ann["rotation"], "velocity": list(nusc.box_velocity(token)[:2]),
                "detection_name": name, "detection_score": 1.0,
                "attribute_name": attribute[ann["attribute_tokens"][0]] if ann["attribute_tokens"] else ""})
        results[sample["token"]] = boxes
    assert present == DETECTION_CLASSES
    meta = {"use_camera": False, "use_lidar": True, "use_radar": False, "use_map": False, "use_external": False}
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"meta": meta, "results": results}))
    ev = DetectionEval(nusc, config_factory("detection_cvpr_2019"), str(path), "mini_val", str(tmp_path / "eval"),
                       verbose=False)
    assert {b.detection_name for b in ev.gt_boxes.all} == DETECTION_CLASSES  # after the devkit's filters
    metrics, _ = ev.evaluate()
    summary = metrics.serialize()
    assert summary["mean_ap"] >= 0.99, summary["mean_dist_aps"]
    assert summary["nd_score"] >= 0.99, summary["tp_errors"]


def test_annotations_are_plausible(nusc):
    attrs = {a["token"]: a["name"] for a in nusc.attribute}
    for ann in nusc.sample_annotation:
        name = category_to_detection_name(ann["category_name"])
        assert name in DETECTION_CLASSES
        w, l, h = ann["size"]
        assert 0.2 < w < 3.2 and 0.2 < l < 15 and 0.5 < h <= 4.5
        assert ann["visibility_token"] in {"1", "2", "3", "4"}
        names = [attrs[t] for t in ann["attribute_tokens"]]
        speed = np.linalg.norm(nusc.box_velocity(ann["token"])[:2])
        if name in ("barrier", "traffic_cone"):
            assert names == [] and speed < 1e-3
        elif name == "pedestrian":
            assert len(names) == 1 and names[0].startswith("pedestrian.")
            assert (names[0] == "pedestrian.moving") == (speed > 0.3) and speed < 2.5
        elif name in ("bicycle", "motorcycle"):
            assert len(names) == 1 and names[0].startswith("cycle.")
        else:
            assert len(names) == 1 and names[0].startswith("vehicle.")
            assert (names[0] == "vehicle.moving") == (speed > 0.3) and speed < 20
        assert abs(ann["translation"][2] - h / 2) < 1e-6  # standing on the ground


def test_objects_never_overlap(nusc):
    shapely = pytest.importorskip("shapely")
    from shapely.geometry import Polygon

    for sample in nusc.sample[::2]:
        polys = [Polygon(_box(nusc.get("sample_annotation", t)).bottom_corners()[:2].T) for t in sample["anns"]]
        tree = shapely.STRtree(polys)
        for i, j in zip(*tree.query(polys, predicate="intersects")):
            if i < j:
                assert polys[i].intersection(polys[j]).area < 1e-6, (sample["token"], i, j)


def test_objects_stand_where_they_belong(nusc, synthetic_root):
    """Vehicles on the road (parked ones also in car parks), pedestrians on walkways or crossings
    (construction workers also in their closed lane),
    barriers and cones on the road outside the driving lanes (devkit map lookups)."""
    attrs = {a["token"]: a["name"] for a in nusc.attribute}
    counts = {}
    for sample in _val_samples(nusc)[:1] + _val_samples(nusc)[-1:]:
        location = nusc.get("log", nusc.get("scene", sample["scene_token"])["log_token"])["location"]
        m = NuScenesMap(str(synthetic_root), location)
        ego = nusc.get("ego_pose", nusc.get("sample_data", sample["data"]["LIDAR_TOP"])["ego_pose_token"])
        for token in sample["anns"]:
            ann = nusc.get("sample_annotation", token)
            x, y = ann["translation"][:2]
            if np.hypot(x - ego["translation"][0], y - ego["translation"][1]) > 40:
                continue
            name = category_to_detection_name(ann["category_name"])
            attr = attrs[ann["attribute_tokens"][0]] if ann["attribute_tokens"] else ""

            def on(layer):
                return m.record_on_point(x, y, layer) != ""

            if ann["category_name"] == "human.pedestrian.construction_worker":
                ok = on("walkway") or on("drivable_area")
            elif name == "pedestrian":
                ok = on("walkway") or on("ped_crossing")
            elif name in ("barrier", "traffic_cone"):
                ok = on("drivable_area") and not on("lane")
            elif attr in ("vehicle.parked", "cycle.without_rider"):
                ok = on("drivable_area") or on("carpark_area") or on("walkway")
            else:
                ok = on("drivable_area")
            assert ok, (name, attr, ann["translation"])
            counts[name] = counts.get(name, 0) + 1
    assert len(counts) >= 8


# ---- geometry: LiDAR, cameras, sweeps --------------------------------------------------------------
def test_lidar_points_fall_in_their_boxes(nusc):
    checked = 0
    for sample in nusc.sample[::3]:
        pts = _to_global(nusc, sample["data"]["LIDAR_TOP"], _load_points(nusc, sample["data"]["LIDAR_TOP"]))
        for token in sample["anns"]:
            ann = nusc.get("sample_annotation", token)
            if ann["num_lidar_pts"] < 10:
                continue
            box = _box(ann)
            near = np.linalg.norm(pts[:, :2] - box.center[:2], axis=1) < np.linalg.norm(box.wlh[:2]) / 2 + 0.3
            # The annotated count is what lies in the box, up to the 1 cm range noise (a 5 cm margin).
            # Ground returns (z = 0) inside the margin count too, so the count off the ground is the
            # sharper bound: only returns at the foot of a face (z < 5 mm) are left out of it.
            inside = points_in_box(Box(box.center, box.wlh + 0.1, box.orientation), pts[near].T)
            off_ground = (inside & (pts[near, 2] > 0.005)).sum()
            n = ann["num_lidar_pts"]
            assert inside.sum() >= n >= off_ground - 1 >= n - 3 - 0.05 * n, (ann["category_name"], off_ground, ann)
            checked += 1
    assert checked > 50


def _hue_distance(a: float, b: float) -> float:
    d = abs(a - b) % 360
    return min(d, 360 - d)


def test_cameras_render_boxes_where_annotated(nusc):
    """Project each annotated box centre into the cameras: the pixel has that class's paint."""
    hits = total = 0
    for sample in _val_samples(nusc):
        for ch in CAMERA_NAMES:
            sd_token = sample["data"][ch]
            path, boxes, k = nusc.get_sample_data(sd_token, box_vis_level=BoxVisibility.ALL)
            img = np.asarray(Image.open(path).convert("RGB"), dtype=np.float64) / 255.0
            boxes = sorted(boxes, key=lambda b: b.center[2])
            for i, box in enumerate(boxes):
                ann = nusc.get("sample_annotation", box.token)
                name = category_to_detection_name(box.name)
                if ann["visibility_token"] != "4" or box.center[2] > 30 or name in ("barrier", "traffic_cone"):
                    continue
                u, v = view_points(box.center[:, None], k, normalize=True)[:2, 0]
                # Skip boxes whose centre is hidden behind a nearer box in this view (naive check).
                if any(_covers(b, box.center, k) for b in boxes[:i]):
                    continue
                patch = img[int(v) - 1:int(v) + 2, int(u) - 1:int(u) + 2].reshape(-1, 3).mean(0)
                hue, sat, _ = colorsys.rgb_to_hsv(*patch)
                total += 1
                best = min(range(len(CLASS_NAMES)), key=lambda c: _hue_distance(hue * 360, CLASS_HUES[c]))
                hits += sat > 0.35 and CLASS_NAMES[best] == name
    assert total >= 20
    assert hits >= 0.9 * total, (hits, total)


def _covers(front: Box, point: np.ndarray, k: np.ndarray) -> bool:
    """Does `front` (camera frame) cover the projection of `point` (by its projected corner hull)?"""
    corners = front.corners()
    if (corners[2] < 0.1).any():
        return True
    uv = view_points(corners, k, normalize=True)[:2]
    p = view_points(point[:, None], k, normalize=True)[:2, 0]
    return uv[0].min() <= p[0] <= uv[0].max() and uv[1].min() <= p[1] <= uv[1].max()


def test_sweeps_align_only_with_their_ego_poses(nusc):
    """Points of a small parked object from 10 sweeps coincide in the global frame with per-sweep ego
    poses (spread within the box); taken without them (keyframe pose for all) they smear by the ego motion."""
    checked = 0
    for sample in nusc.sample:
        key = sample["data"]["LIDAR_TOP"]
        anns = [nusc.get("sample_annotation", t) for t in sample["anns"]]
        static = [a for a in anns if a["num_lidar_pts"] >= 15 and max(a["size"][:2]) <= 1.8
                  and np.linalg.norm(nusc.box_velocity(a["token"])[:2]) < 1e-3]
        if not static:
            continue
        ann = max(static, key=lambda a: a["num_lidar_pts"])
        box = _box(ann)
        half_diag = np.linalg.norm(box.wlh[:2]) / 2
        key_to_global = _sensor_to_global(nusc, key)
        right_all, naive_all, token = [], [], key
        for _ in range(10):
            pts = _load_points(nusc, token)[:, :3].astype(np.float64)
            right = _to_global(nusc, token, pts)
            mask = points_in_box(Box(box.center, box.wlh + 0.2, box.orientation), right.T) & (right[:, 2] > 0.005)
            right_all.append(right[mask])
            # Without the sweep's pose: its points taken as if they were in the keyframe's sensor frame.
            naive_all.append(pts[mask] @ key_to_global[:3, :3].T + key_to_global[:3, 3])
            token = nusc.get("sample_data", token)["prev"]
        if sum(len(p) > 0 for p in right_all) < 8:
            continue
        right_all, naive_all = np.concatenate(right_all), np.concatenate(naive_all)
        spread = np.linalg.norm(right_all[:, :2] - box.center[:2], axis=1).max()
        smear = np.linalg.norm(naive_all[:, :2] - box.center[:2], axis=1).max()
        assert spread <= half_diag + 0.06, (ann["category_name"], spread, half_diag)
        assert smear > half_diag + 1.0, (ann["category_name"], smear)  # the ego drives >= 6 m/s for 0.45 s
        checked += 1
    assert checked >= 5


# ---- generator behaviour ---------------------------------------------------------------------------
TINY = dict(num_scenes=1, samples_per_scene=2, image_size=(64, 36), lidar_azimuth_steps=64, workers=1,
            show_progress=False)


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_deterministic_for_a_seed(tmp_path):
    a = _tree(generate(tmp_path / "a", seed=3, **TINY))
    b = _tree(generate(tmp_path / "b", seed=3, **TINY))
    c = _tree(generate(tmp_path / "c", seed=4, **TINY))
    assert a == b
    assert a != c


def test_more_than_ten_scenes_use_trainval(tmp_path):
    root = generate(tmp_path / "big", seed=0, **{**TINY, "num_scenes": 11})
    nusc = NuScenes("v1.0-trainval", str(root), verbose=False)
    splits = create_splits_scenes()
    names = {s["name"] for s in nusc.scene}
    assert len(names) == 11 and names <= set(splits["train"]) | set(splits["val"])
    assert names & set(splits["val"]) and names & set(splits["train"])


def test_workers_do_not_change_the_output(tmp_path):
    two = dict(TINY, num_scenes=2)
    serial = _tree(generate(tmp_path / "serial", seed=0, **two))
    parallel = _tree(generate(tmp_path / "parallel", seed=0, **{**two, "workers": 2}))
    assert serial == parallel


@pytest.mark.parametrize("kwargs", [dict(num_scenes=-1), dict(num_scenes=0), dict(samples_per_scene=-2),
                                    dict(samples_per_scene=1), dict(image_size=(0, 10)), dict(workers=0)])
def test_bad_arguments(tmp_path, kwargs):
    with pytest.raises(ValueError):
        generate(tmp_path / "out", **{**TINY, **kwargs})
    assert not (tmp_path / "out").exists()


def test_unwritable_output(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(OSError, match="file"):
        generate(blocker / "out", **TINY)
    if os.geteuid() != 0:  # root ignores permission bits
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(PermissionError, match="locked"):
            generate(locked / "out", **TINY)


def test_never_replaces_foreign_data(tmp_path):
    precious = tmp_path / "nuscenes"
    precious.mkdir()
    (precious / "v1.0-trainval").mkdir()
    with pytest.raises(FileExistsError, match="not a synthetic drive"):
        generate(precious, overwrite=True, **TINY)
    assert (precious / "v1.0-trainval").is_dir()


def test_existing_output_and_interrupted_run(tmp_path, monkeypatch):
    out = generate(tmp_path / "out", seed=1, **TINY)
    with pytest.raises(FileExistsError, match="overwrite"):
        generate(out, seed=1, **TINY)
    before = _tree(out)

    from bevfusion.data.synthetic import kernels

    def boom(*args, **kwargs):
        raise RuntimeError("interrupted")

    monkeypatch.setattr(kernels, "render_camera", boom)
    with pytest.raises(RuntimeError, match="interrupted"):
        generate(out, seed=2, overwrite=True, **TINY)
    assert _tree(out) == before  # the complete old output is untouched
    with pytest.raises(RuntimeError):
        generate(tmp_path / "new", seed=2, **TINY)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no partial output left behind
    monkeypatch.undo()
    assert _tree(generate(out, seed=2, overwrite=True, **TINY)) != before


def test_cli(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_synthetic",
                                                  Path(__file__).parents[2] / "tools" / "make_synthetic.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    args = ["--out", str(tmp_path / "d"), "--scenes", "1", "--samples-per-scene", "2", "--image-size", "64", "36",
            "--lidar-azimuth-steps", "64", "--workers", "1", "--no-progress"]
    assert cli.main(args) == 0
    assert NuScenes("v1.0-mini", str(tmp_path / "d"), verbose=False).scene[0]["name"] == "scene-0061"
    assert cli.main(args) == 0  # same settings: nothing to do
    assert cli.main(args + ["--seed", "5"]) == 2  # different settings: refuses without --overwrite
    with pytest.raises(SystemExit):
        cli.main(["--out", str(tmp_path / "e"), "--scenes", "-1"])
    with pytest.raises(SystemExit):
        cli.main(["--out", str(tmp_path / "e"), "--samples-per-scene", "0"])
    assert not (tmp_path / "e").exists()
