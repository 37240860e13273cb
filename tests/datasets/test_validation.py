"""Bad input data raises DataError naming the file, the sample token and the field (never a silent change).

Info records come from the synthetic drive's converted val infos (the official structure); broken files
are written to tmp_path, and the info records are pointed at them.
"""
from __future__ import annotations

import copy
import json
import re
import shutil

import numpy as np
import pytest
from PIL import Image

from bevfusion.datasets.errors import DataError, DataFileNotFoundError, load_json
from bevfusion.datasets.nuscenes import NuScenesDataset
from bevfusion.datasets.transforms.loading import LoadMultiViewImageFromFiles, LoadPointsFromFile, load_points
from bevfusion.datasets.validation import check_infos
from bevfusion.utils.io import dump_pickle, load_pickle


@pytest.fixture
def val(converted):
    """(dataset root, a deep copy of the val infos, sorted by time as the dataset orders them)."""
    root, out, written, _, _ = converted
    infos = sorted(load_pickle(written["val"])["infos"], key=lambda i: i["timestamp"])
    return root, copy.deepcopy(infos)


def _write(tmp_path, infos, name="infos.pkl"):
    path = tmp_path / name
    dump_pickle({"infos": infos, "metadata": {"version": "v1.0-mini"}}, path)
    return path


def _set(path):
    """A mutation that assigns `value` at a dotted path (`cams.CAM_FRONT.camera_intrinsics`, `sweeps.0.timestamp`)."""
    *parents, last = path.split(".")

    def apply(info, value):
        node = info
        for p in parents:
            node = node[int(p)] if isinstance(node, list) else node[p]
        if isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = value
    return apply


def _nan_at(value, index):
    a = np.array(value, dtype=np.float64, copy=True)
    a[index] = np.nan
    return a


# (dotted field, how to break its current value, the field as the message names it, problem words)
INFO_CASES = [
    ("cams.CAM_FRONT.camera_intrinsics", lambda v: _nan_at(v, (0, 2)), "cams.CAM_FRONT.camera_intrinsics",
     "NaN or inf"),
    ("cams.CAM_BACK.sensor2lidar_rotation", lambda v: _nan_at(v, (1, 1)), "cams.CAM_BACK.sensor2lidar_rotation",
     "NaN or inf"),
    ("cams.CAM_BACK.sensor2lidar_rotation", lambda v: 1.5 * np.asarray(v), "cams.CAM_BACK.sensor2lidar_rotation",
     "not a rotation matrix"),
    ("cams.CAM_FRONT_LEFT.sensor2lidar_translation", lambda v: _nan_at(v, 2),
     "cams.CAM_FRONT_LEFT.sensor2lidar_translation", "NaN or inf"),
    ("cams.CAM_FRONT.camera_intrinsics", lambda v: -np.asarray(v), "cams.CAM_FRONT.camera_intrinsics",
     "not a camera matrix"),
    ("sweeps.2.sensor2lidar_rotation", lambda v: _nan_at(v, (0, 0)), r"sweeps\[2\].sensor2lidar_rotation",
     "NaN or inf"),
    ("lidar_path", lambda v: v.encode(), "lidar_path", "expected a path string, got bytes"),
    ("lidar_path", lambda v: np.array([v]), "lidar_path", "expected a path string, got ndarray"),
    ("gt_boxes", lambda v: np.asarray(v)[:, :5], "gt_boxes", r"expected shape \(M, 7\)"),
    ("gt_boxes", lambda v: _nan_at(v, (3, 0)), "gt_boxes", "NaN or inf"),
    ("timestamp", lambda v: str(v), "timestamp", "expected a timestamp .*got str"),
    ("sweeps.0.timestamp", lambda v: str(v), r"sweeps\[0\].timestamp", "got str"),
    ("ego2global_rotation", lambda v: list(v)[:3], "ego2global_rotation",
     r"quaternion of shape \(4,\), got shape \(3,\)"),
    ("cams.CAM_BACK_RIGHT.sensor2ego_rotation", lambda v: [0.0, 0.0, 0.0, 0.0],
     "cams.CAM_BACK_RIGHT.sensor2ego_rotation", "not a unit quaternion"),
    ("lidar2ego_translation", lambda v: ["1.0", "0", "1.8"], "lidar2ego_translation", "as numbers, got list"),
    ("gt_names", lambda v: np.arange(len(v)), "gt_names", "expected strings"),
    ("gt_velocity", lambda v: np.full_like(np.asarray(v, dtype=np.float64), np.inf), "gt_velocity", "inf"),
    ("valid_flag", lambda v: np.asarray(v).astype(str), "valid_flag", "expected booleans"),
    ("num_lidar_pts", lambda v: np.asarray(v)[:-1], "num_lidar_pts", "entries, gt_boxes has"),
]


@pytest.mark.parametrize("field, corrupt, named, problem", INFO_CASES, ids=[f"{c[0]}-{c[3][:12]}" for c in INFO_CASES])
def test_bad_info_field_names_file_sample_and_field(val, tmp_path, field, corrupt, named, problem):
    root, infos = val
    target = infos[2]
    parts = field.split(".")
    node = target
    for p in parts:
        node = node[int(p)] if isinstance(node, list) else node[p]
    _set(field)(target, corrupt(node))
    path = _write(tmp_path, infos)
    with pytest.raises(DataError, match=rf"{re.escape(str(path))}: sample {target['token']}: {named}: .*{problem}"):
        NuScenesDataset(root, path, pipeline=[])


def test_valid_infos_pass_and_nan_velocity_is_allowed(val, tmp_path):
    root, infos = val
    infos[0]["gt_velocity"][:] = np.nan  # official: NaN where a box has no neighbouring annotation
    ds = NuScenesDataset(root, _write(tmp_path, infos), pipeline=[])
    assert np.isfinite(ds.get_ann_info(0)["gt_bboxes_3d"]).all()


def test_info_file_structure_errors(val, tmp_path):
    root, infos = val
    bad = _write(tmp_path, {"a": 1}, "not_a_list.pkl")
    with pytest.raises(DataError, match=r"not_a_list.pkl: 'infos' is a dict"):
        NuScenesDataset(root, bad, pipeline=[])
    with pytest.raises(DataError, match=r"x.pkl: sample #1: the info entry is a list"):
        check_infos([infos[0], [1, 2]], "x.pkl", require_annotations=True)
    broken = copy.deepcopy(infos)
    broken[1]["token"] = 17
    with pytest.raises(DataError, match=r"x.pkl: sample #1: token: expected a string"):
        check_infos(broken, "x.pkl", require_annotations=True)
    # DataError is a ValueError, and a KeyError for missing keys (as before)
    del infos[3]["cams"]["CAM_BACK"]["camera_intrinsics"]
    token = infos[3]["token"]
    with pytest.raises(KeyError, match=rf"sample {token} camera CAM_BACK lacks keys \['camera_intrinsics'\]"):
        check_infos(infos, "x.pkl", require_annotations=True)
    assert issubclass(DataError, ValueError)


# ---------------------------------------------------------------------------------------------------
# Point files


def _points_results(root, info):
    return {"lidar_path": info["lidar_path"], "token": info["token"], "dataset_root": root}


@pytest.mark.parametrize("cut, message", [
    (lambda raw: raw[:-2], r"has \d+ bytes, not a whole number of float32 values"),
    (lambda raw: raw[:-8], r"has \d+ float32 values, not a multiple of the point dimension 5"),
    (lambda raw: b"", r"is empty \(no points\)"),
    (lambda raw: np.frombuffer(raw, np.float32).astype(np.float64).tobytes(), r"a coordinate of .* m .*not float32"),
    (lambda raw: np.where(np.arange(len(raw) // 4) == 17, np.float32(np.nan), np.frombuffer(raw, np.float32))
     .astype(np.float32).tobytes(), r"point 3 has NaN or inf"),
])
def test_bad_point_files_raise(val, tmp_path, cut, message):
    root, infos = val
    info = infos[0]
    broken = tmp_path / "broken.pcd.bin"
    broken.write_bytes(cut(open(info["lidar_path"], "rb").read()))
    results = {**_points_results(root, info), "lidar_path": str(broken)}
    with pytest.raises(DataError, match=rf"sample {info['token']}: point file {re.escape(str(broken))}.*{message}"):
        LoadPointsFromFile(load_dim=5, use_dim=5)(results)


def test_empty_sweep_file_raises_naming_it(val, tmp_path):
    from bevfusion.datasets.transforms.loading import LoadPointsFromMultiSweeps

    root, infos = val
    info = infos[1]
    empty = tmp_path / "sweeps" / "LIDAR_TOP" / "empty.pcd.bin"
    empty.parent.mkdir(parents=True)
    empty.write_bytes(b"")
    info["sweeps"][0]["data_path"] = str(empty)
    results = {**_points_results(root, info), "sweeps": info["sweeps"], "timestamp": info["timestamp"] / 1e6,
               "test_mode": True}
    LoadPointsFromFile()(results)
    with pytest.raises(DataError, match=rf"sample {info['token']}: point file {re.escape(str(empty))} is empty"):
        LoadPointsFromMultiSweeps(sweeps_num=9)(results)


def test_database_object_files_may_be_empty(tmp_path):
    path = tmp_path / "obj.bin"
    path.write_bytes(b"")
    assert load_points(str(path), 5, allow_empty=True).shape == (0, 5)
    results = LoadPointsFromFile()({"lidar_path": str(path), "allow_empty_points": True})
    assert results["points"].shape == (0, 5) and results["points"].dtype == np.float32


def test_missing_file_is_a_file_not_found_and_a_data_error(val, tmp_path):
    root, infos = val
    info = infos[0]
    results = {**_points_results(root, info), "lidar_path": str(tmp_path / "samples" / "LIDAR_TOP" / "gone.bin")}
    with pytest.raises(DataFileNotFoundError, match=rf"sample {info['token']}: file .*gone.bin is missing") as e:
        LoadPointsFromFile()(results)
    assert isinstance(e.value, FileNotFoundError) and isinstance(e.value, DataError)


# ---------------------------------------------------------------------------------------------------
# Images


def _image_results(root, ds, index):
    data = ds.get_data_info(index)
    return data, data["camera_names"].index("CAM_FRONT")


@pytest.mark.parametrize("size", [(10, 10), (200, 112), (800, 450), (400, 150)])
def test_image_of_the_wrong_size_raises(val, tmp_path, size):
    root, infos = val
    ds = NuScenesDataset(root, _write(tmp_path, infos), pipeline=[])
    data, k = _image_results(root, ds, 0)
    wrong = tmp_path / f"wrong_{size[0]}x{size[1]}.jpg"
    Image.new("RGB", size, (90, 20, 20)).save(wrong)
    data["image_paths"][k] = str(wrong)
    cx, cy = data["camera_intrinsics"][k][:2, 2]
    with pytest.raises(DataError, match=rf"sample {data['token']}: image {re.escape(str(wrong))} is "
                                        rf"{size[0]}x{size[1]}, but cams.CAM_FRONT.camera_intrinsics .* "
                                        rf"\({cx:.1f}, {cy:.1f}\)"):
        LoadMultiViewImageFromFiles()(data)
    # the check can be turned off (a camera whose principal point is far off-centre)
    data = ds.get_data_info(0)
    data["image_paths"][k] = str(wrong)
    assert LoadMultiViewImageFromFiles(check_image_size=False)(data)["img"][k].size == size


def test_images_of_the_right_size_load(val, tmp_path):
    root, infos = val
    ds = NuScenesDataset(root, _write(tmp_path, infos), pipeline=[])
    out = LoadMultiViewImageFromFiles()(ds.get_data_info(1))
    assert [im.size for im in out["img"]] == [(400, 225)] * 6
    assert "camera_mask" not in out and "dropped" not in out  # no dropout options: no dropout keys


def test_unreadable_image_raises_naming_it(val, tmp_path):
    root, infos = val
    ds = NuScenesDataset(root, _write(tmp_path, infos), pipeline=[])
    data, k = _image_results(root, ds, 0)
    junk = tmp_path / "junk.jpg"
    junk.write_bytes(b"not an image at all")
    data["image_paths"][k] = str(junk)
    with pytest.raises(DataError, match=rf"sample {data['token']}: cannot read image {re.escape(str(junk))}"):
        LoadMultiViewImageFromFiles()(data)


# ---------------------------------------------------------------------------------------------------
# JSON tables


def test_truncated_devkit_table_names_the_file(converted, tmp_path):
    from bevfusion.datasets.converters.nuscenes import create_nuscenes_infos
    from bevfusion.datasets.devkit import open_nuscenes

    root = converted[0]
    copy_root = tmp_path / "nuscenes"
    shutil.copytree(root / "v1.0-mini", copy_root / "v1.0-mini")
    sample_json = copy_root / "v1.0-mini" / "sample.json"
    text = sample_json.read_text()
    sample_json.write_text(text[: len(text) // 2])
    with pytest.raises(DataError, match=rf"{re.escape(str(sample_json))}: not readable as JSON"):
        open_nuscenes("v1.0-mini", copy_root)
    with pytest.raises(DataError, match=re.escape(str(sample_json))):
        create_nuscenes_infos(copy_root, "v1.0-mini", tmp_path / "out")
    with pytest.raises(DataFileNotFoundError, match="v1.0-trainval"):
        open_nuscenes("v1.0-trainval", copy_root)


def test_truncated_map_expansion_names_the_file(converted, tmp_path):
    from bevfusion.datasets.transforms.bev_seg import get_nuscenes_map

    root = converted[0]
    location = sorted(p.stem for p in (root / "maps" / "expansion").glob("*.json"))[0]
    copy_root = tmp_path / "nuscenes"
    (copy_root / "maps" / "expansion").mkdir(parents=True)
    text = (root / "maps" / "expansion" / f"{location}.json").read_text()
    broken = copy_root / "maps" / "expansion" / f"{location}.json"
    broken.write_text(text[:1000])
    with pytest.raises(DataError, match=rf"{re.escape(str(broken))}: not readable as JSON"):
        get_nuscenes_map(copy_root, location)


def test_truncated_result_json_names_the_file(converted, tmp_path):
    from bevfusion.evaluation.nuscenes_det import evaluate_detection

    root, _, _, _, nusc = converted
    result = tmp_path / "results_nusc.json"
    result.write_text(json.dumps({"meta": {}, "results": {}})[:-5])
    with pytest.raises(DataError, match=rf"{re.escape(str(result))}: not readable as JSON"):
        evaluate_detection(result, root, "v1.0-mini", "mini_val", tmp_path, nusc=nusc)
    result.write_text("[1, 2]")
    assert load_json(result) == [1, 2]
