"""Write nuScenes info files with the same structure and fields as the official converter.

`create_nuscenes_infos` reads a dataset with nuscenes-devkit and writes `nuscenes_infos_train.pkl` and
`nuscenes_infos_val.pkl` (or `nuscenes_infos_test.pkl` for a test version), each
`{"infos": [info, ...], "metadata": {"version": ...}}`, with the fields listed in the facts sheet §6.1
(official box convention in `gt_boxes`). `create_groundtruth_database` writes the per-object point
files and `nuscenes_dbinfos_train.pkl` for copy-paste augmentation.

Every file a sample refers to is checked while converting: a missing file is an error naming the
file and the sample token, never a silently shorter info list.
"""
from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from bevfusion.structures.boxes import official_to_internal
from bevfusion.structures.geometry import invert_transform, make_transform
from bevfusion.utils.io import atomic_write_bytes, dump_pickle, load_pickle
from bevfusion.utils.logging import get_logger, progress

__all__ = [
    "CAMERA_NAMES",
    "NAME_MAPPING",
    "create_nuscenes_infos",
    "create_groundtruth_database",
    "split_scenes",
]

log = get_logger("create_data")

# The image order fed to the model (the insertion order of the info `cams` dict).
CAMERA_NAMES = ("CAM_FRONT", "CAM_FRONT_RIGHT", "CAM_FRONT_LEFT", "CAM_BACK", "CAM_BACK_LEFT", "CAM_BACK_RIGHT")

# nuScenes categories → the 10 detection classes; other categories keep their raw name.
NAME_MAPPING = {
    "movable_object.barrier": "barrier",
    "vehicle.bicycle": "bicycle",
    "vehicle.bus.bendy": "bus",
    "vehicle.bus.rigid": "bus",
    "vehicle.car": "car",
    "vehicle.construction": "construction_vehicle",
    "vehicle.motorcycle": "motorcycle",
    "human.pedestrian.adult": "pedestrian",
    "human.pedestrian.child": "pedestrian",
    "human.pedestrian.construction_worker": "pedestrian",
    "human.pedestrian.police_officer": "pedestrian",
    "movable_object.trafficcone": "traffic_cone",
    "vehicle.trailer": "trailer",
    "vehicle.truck": "truck",
}

# GT database sampling groups of the official LiDAR-only config (max objects per class per sample).
DB_CLASSES = ("car", "truck", "construction_vehicle", "bus", "trailer", "barrier", "motorcycle",
              "bicycle", "pedestrian", "traffic_cone")


def split_scenes(version: str) -> dict[str, list[str]]:
    """Scene names per split for a dataset version, as the devkit defines them."""
    from nuscenes.utils import splits

    if version == "v1.0-trainval":
        return {"train": list(splits.train), "val": list(splits.val)}
    if version == "v1.0-test":
        return {"test": list(splits.test)}
    if version == "v1.0-mini":
        return {"train": list(splits.mini_train), "val": list(splits.mini_val)}
    raise ValueError(f"unknown nuScenes version {version!r} (expected v1.0-trainval, v1.0-test or v1.0-mini)")


def _check_file(path: str, sample_token: str) -> None:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"sample {sample_token}: file {path} is missing")


def _sample_data(nusc, sd_token: str, root: str, sample_token: str):
    """(sample_data, calibrated_sensor, ego_pose records, checked file path, sensor2ego, ego2global)."""
    sd = nusc.get("sample_data", sd_token)
    cs = nusc.get("calibrated_sensor", sd["calibrated_sensor_token"])
    pose = nusc.get("ego_pose", sd["ego_pose_token"])
    data_path = os.path.join(root, sd["filename"])
    _check_file(data_path, sample_token)
    return (sd, cs, pose, data_path, make_transform(cs["rotation"], cs["translation"]),
            make_transform(pose["rotation"], pose["translation"]))


def _sensor_record(nusc, sd_token: str, sensor_type: str, lidar2global: np.ndarray,
                   root: str, sample_token: str) -> dict[str, Any]:
    """A sweep/camera dict: paths, calibration, ego pose at the sensor time, sensor→keyframe-LiDAR
    (and `camera_intrinsics` for a camera)."""
    sd, cs, pose, data_path, sensor2ego, ego2global = _sample_data(nusc, sd_token, root, sample_token)
    # sensor → ego(t_sensor) → global → ego(t_lidar) → lidar: compensates ego motion.
    sensor2lidar = invert_transform(lidar2global) @ ego2global @ sensor2ego
    record = {
        "data_path": data_path,
        "type": sensor_type,
        "sample_data_token": sd["token"],
        "sensor2ego_translation": list(cs["translation"]),
        "sensor2ego_rotation": list(cs["rotation"]),
        "ego2global_translation": list(pose["translation"]),
        "ego2global_rotation": list(pose["rotation"]),
        "timestamp": sd["timestamp"],
        "sensor2lidar_rotation": sensor2lidar[:3, :3],
        "sensor2lidar_translation": sensor2lidar[:3, 3],
    }
    if sensor_type != "lidar":
        record["camera_intrinsics"] = np.asarray(cs["camera_intrinsic"], dtype=np.float64)
    return record


def _sample_info(nusc, sample: dict, root: str, max_sweeps: int, with_annotations: bool) -> dict[str, Any]:
    token = sample["token"]
    lidar_token = sample["data"]["LIDAR_TOP"]
    sd, cs, pose, lidar_path, lidar2ego, ego2global = _sample_data(nusc, lidar_token, root, token)
    lidar2global = ego2global @ lidar2ego
    scene = nusc.get("scene", sample["scene_token"])
    info: dict[str, Any] = {
        "lidar_path": lidar_path,
        "token": token,
        "sweeps": [],
        "cams": {},
        "lidar2ego_translation": list(cs["translation"]),
        "lidar2ego_rotation": list(cs["rotation"]),
        "ego2global_translation": list(pose["translation"]),
        "ego2global_rotation": list(pose["rotation"]),
        "timestamp": sample["timestamp"],
        "location": nusc.get("log", scene["log_token"])["location"],
    }
    for cam in CAMERA_NAMES:
        if cam not in sample["data"]:
            raise KeyError(f"sample {token}: no {cam} sample_data")
        info["cams"][cam] = _sensor_record(nusc, sample["data"][cam], cam, lidar2global, root, token)
    prev = sd["prev"]
    while prev and len(info["sweeps"]) < max_sweeps:
        info["sweeps"].append(_sensor_record(nusc, prev, "lidar", lidar2global, root, token))
        prev = nusc.get("sample_data", prev)["prev"]
    if not with_annotations:
        return info

    _, boxes, _ = nusc.get_sample_data(lidar_token)  # annotation boxes in the LiDAR frame
    anns = [nusc.get("sample_annotation", t) for t in sample["anns"]]
    n = len(boxes)
    locs = np.array([b.center for b in boxes], dtype=np.float64).reshape(n, 3)
    dims = np.array([b.wlh for b in boxes], dtype=np.float64).reshape(n, 3)
    yaws = np.array([b.orientation.yaw_pitch_roll[0] for b in boxes], dtype=np.float64).reshape(n, 1)
    velocity = np.array([nusc.box_velocity(t)[:2] for t in sample["anns"]], dtype=np.float64).reshape(n, 2)
    # Global velocity → LiDAR frame (rotation only). NaN (no neighbour annotation) stays NaN, as upstream.
    global2lidar_rot = np.linalg.inv(lidar2global[:3, :3])
    velocity = (np.c_[velocity, np.zeros(n)] @ global2lidar_rot.T)[:, :2]
    info["gt_boxes"] = np.concatenate([locs, dims, -yaws - np.pi / 2], axis=1)  # official convention
    info["gt_names"] = np.array([NAME_MAPPING.get(b.name, b.name) for b in boxes])
    info["gt_velocity"] = velocity
    info["num_lidar_pts"] = np.array([a["num_lidar_pts"] for a in anns], dtype=np.int64)
    info["num_radar_pts"] = np.array([a["num_radar_pts"] for a in anns], dtype=np.int64)
    info["valid_flag"] = (info["num_lidar_pts"] + info["num_radar_pts"]) > 0
    return info


def create_nuscenes_infos(root_path: str | os.PathLike, version: str = "v1.0-trainval",
                          out_dir: str | os.PathLike | None = None, max_sweeps: int = 10,
                          info_prefix: str = "nuscenes") -> dict[str, Path]:
    """Convert a nuScenes-format dataset into info pickles; returns {split: written path}.

    Paths inside the infos are `root_path` joined with the devkit's relative file names, as the
    official converter writes them; `NuScenesDataset` also resolves them against its dataset root.
    """
    from bevfusion.datasets.devkit import open_nuscenes

    if max_sweeps < 0:
        raise ValueError(f"max_sweeps must be >= 0, got {max_sweeps}")
    root = os.fspath(root_path)
    out = Path(out_dir if out_dir is not None else root)
    nusc = open_nuscenes(version, root)
    by_name = {s["name"]: s for s in nusc.scene}
    splits = split_scenes(version)
    scene_split: dict[str, str] = {}
    for split, names in splits.items():
        for name in names:
            if name in by_name:
                scene_split[by_name[name]["token"]] = split
    missing = {split: [n for n in names if n not in by_name] for split, names in splits.items()}
    for split, names in missing.items():
        if names and len(names) == len(splits[split]):
            raise ValueError(f"{root}: none of the {split} scenes of {version} exist in the dataset")
        if names:
            log.warning("%d %s scenes of %s are absent from %s and skipped", len(names), split, version, root)

    test = version.endswith("test")
    infos: dict[str, list] = defaultdict(list)
    for sample in progress(nusc.sample, total=len(nusc.sample), desc="infos"):
        split = scene_split.get(sample["scene_token"])
        if split is None:
            continue
        infos[split].append(_sample_info(nusc, sample, root, max_sweeps, with_annotations=not test))
    written = {}
    for split in splits:
        path = out / f"{info_prefix}_infos_{split}.pkl"
        dump_pickle({"infos": infos[split], "metadata": {"version": version}}, path)
        log.info("%s: %d samples → %s", split, len(infos[split]), path)
        written[split] = path
    return written


def _points_of_each_box(points: np.ndarray, boxes: np.ndarray) -> list[np.ndarray]:
    """For each (internal) box, the indices of the points inside it, in point order (faces inclusive).

    The (P, M) membership comes from `ops.boxes.points_in_boxes` (numba); it is read once, point-major,
    and grouped by box, rather than scanned column by column.
    """
    import torch

    from bevfusion.ops.boxes import points_in_boxes

    inside = points_in_boxes(torch.from_numpy(np.ascontiguousarray(points[:, :3], dtype=np.float64)),
                             torch.from_numpy(np.ascontiguousarray(boxes, dtype=np.float64))).numpy()
    point_idx, box_idx = np.nonzero(inside)
    order = np.argsort(box_idx, kind="stable")  # by box; points stay in order within a box
    starts = np.searchsorted(box_idx[order], np.arange(len(boxes) + 1))
    point_idx = point_idx[order]
    return [point_idx[starts[i]:starts[i + 1]] for i in range(len(boxes))]


def create_groundtruth_database(root_path: str | os.PathLike, info_path: str | os.PathLike,
                                out_dir: str | os.PathLike | None = None, info_prefix: str = "nuscenes",
                                num_sweeps: int = 10, classes: tuple[str, ...] = DB_CLASSES,
                                use_valid_flag: bool = True) -> Path:
    """Write `<prefix>_gt_database/*.bin` and `<prefix>_dbinfos_train.pkl` from train infos.

    For each valid box of the listed classes, the points inside it (keyframe plus up to
    `num_sweeps - 1` sweeps, all of them, deterministically) are saved as float32 (n, 5) with xyz
    relative to the box centre. Unlike the official database, the whole box is used rather than its
    upper half (the official code inherits the z quirk, facts §6.3; see docs/COMPATIBILITY.md).
    `box3d_lidar` is stored in the official convention (9 values, with velocity) so that official
    tools read our database and vice versa.
    """
    from bevfusion.datasets.transforms.loading import load_multisweep_points

    root = Path(root_path)
    out = Path(out_dir if out_dir is not None else root)
    db_dir_name = f"{info_prefix}_gt_database"
    db_dir = out / db_dir_name
    db_dir.mkdir(parents=True, exist_ok=True)
    infos = load_pickle(info_path)["infos"]
    db: dict[str, list] = defaultdict(list)
    group = 0
    for info in progress(infos, total=len(infos), desc="gt database"):
        token = info["token"]
        mask = info["valid_flag"] if use_valid_flag else info["num_lidar_pts"] > 0
        names = info["gt_names"][mask]
        velocity = np.nan_to_num(info["gt_velocity"][mask])
        official = np.concatenate([info["gt_boxes"][mask], velocity], axis=1)
        boxes = official_to_internal(official)
        points = load_multisweep_points(info, root, num_sweeps - 1, deterministic=True)
        members = _points_of_each_box(points, boxes)
        for i, name in enumerate(names):
            if name not in classes:
                continue
            obj = points[members[i]]
            obj[:, :3] -= boxes[i, :3]
            rel = f"{db_dir_name}/{token}_{name}_{i}.bin"
            # The dbinfos pickle, written last and fsynced, is what makes the database complete.
            atomic_write_bytes(out / rel, obj.astype(np.float32).tobytes(), fsync=False)
            db[name].append({
                "name": name,
                "path": rel,
                "image_idx": token,
                "gt_idx": i,
                "box3d_lidar": official[i].astype(np.float32),
                "num_points_in_gt": int(len(obj)),
                "difficulty": 0,
                "group_id": group,
            })
            group += 1
    path = out / f"{info_prefix}_dbinfos_train.pkl"
    dump_pickle(dict(db), path)
    log.info("gt database: %s", ", ".join(f"{k} {len(v)}" for k, v in sorted(db.items())))
    return path
