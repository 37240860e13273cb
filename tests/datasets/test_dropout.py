"""Sensor dropout on the synthetic drive, end to end through the official test pipeline and collate.

Every dropped run is compared with the same samples loaded without dropout (what must not change:
kept images, points, ground truth, matrices) and with an independent computation of what must.
"""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from bevfusion.config import load_config
from bevfusion.datasets.builder import build_dataset
from bevfusion.datasets.dropout import COUNT_KEYS, sum_dropout_counts
from bevfusion.datasets.errors import DataFileNotFoundError
from bevfusion.datasets.loader import build_dataloader
from bevfusion.datasets.nuscenes import NuScenesDataset
from bevfusion.datasets.transforms.formatting import MATRIX_KEYS
from bevfusion.structures.geometry import make_transform
from bevfusion.utils.io import dump_pickle, load_pickle

CONFIG = "configs/nuscenes/default.yaml"
MEAN, STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
SWEEPS_NUM = 9  # the config's sweeps_num


def _cfg(root, ann):
    return load_config(CONFIG, [
        f"dataset_root={root}/", f"data.test.ann_file={ann}",
        # The fixture's images are 400x225: scale the test resize so the crop holds image.
        "augment2d.resize=[[1.6, 1.9], [1.76, 1.76]]"])


def _dataset(converted, ann=None, **options):
    root, out = converted[0], converted[1]
    cfg = _cfg(root, ann or out / "nuscenes_infos_val.pkl")
    return build_dataset(cfg.data.test, "data.test", filter_empty_gt=False, **options)


def _counts(**nonzero):
    return {key: nonzero.get(key, 0) for key in COUNT_KEYS}


@pytest.fixture(scope="module")
def plain(converted):
    """The val samples without any dropout option."""
    ds = _dataset(converted)
    return ds, [ds[i] for i in range(len(ds))]


def _black(shape):
    """A black image after ImageNormalize: (0 - mean) / std per channel."""
    return torch.from_numpy(((0.0 - MEAN) / STD).astype(np.float32))[:, None, None].expand(shape)


def _assert_same_except(sample, ref, skip=()):
    for key in ("img", "points", "gt_bboxes_3d", "gt_labels_3d", "gt_masks_bev", *MATRIX_KEYS):
        if key in skip or key not in ref:
            continue
        assert torch.equal(sample[key], ref[key]), key
    assert sample["metas"]["token"] == ref["metas"]["token"]


def test_without_options_no_dropout_keys(plain):
    ds, samples = plain
    assert not ds.dropout_enabled
    for s in samples:
        assert "camera_mask" not in s and "dropped" not in s["metas"]
    batch = next(iter(build_dataloader(ds, samples_per_gpu=2, shuffle=False)))
    assert "camera_mask" not in batch
    assert ds.dropout_counts == _counts()


def test_drop_cameras_by_name(converted, plain):
    _, ref = plain
    dropped = ["CAM_FRONT", "CAM_BACK_LEFT"]
    ds = _dataset(converted, drop_sensors={"cameras": dropped})
    names = list(ds.camera_names)
    mask = [n not in dropped for n in names]
    for i in range(len(ds)):
        s = ds[i]
        assert s["camera_mask"].dtype == torch.bool and s["camera_mask"].tolist() == mask
        for k, keep in enumerate(mask):
            if keep:
                assert torch.equal(s["img"][k], ref[i]["img"][k])
            else:
                torch.testing.assert_close(s["img"][k], _black(s["img"][k].shape))
        _assert_same_except(s, ref[i], skip=("img",))  # points, GT and every matrix unchanged
        assert s["metas"]["dropped"] == {"cameras": [n for n in names if n in dropped], "lidar": False, "sweeps": 0,
                                         "counts": _counts(dropped_cameras=2)}
    assert ds.dropout_counts == _counts(dropped_cameras=2 * len(ds))


def test_drop_all_cameras_through_collate(converted, plain):
    _, ref = plain
    ds = _dataset(converted, drop_sensors={"cameras": "all"})
    batch = next(iter(build_dataloader(ds, samples_per_gpu=2, shuffle=False)))
    assert batch["camera_mask"].shape == (2, 6) and batch["camera_mask"].dtype == torch.bool
    assert not batch["camera_mask"].any()
    assert batch["img"].shape == (2, 6, 3, 256, 704)
    torch.testing.assert_close(batch["img"], _black(batch["img"].shape[2:]).expand(batch["img"].shape))
    for b in range(2):
        assert torch.equal(batch["points"][b], ref[b]["points"])
        assert torch.equal(batch["gt_bboxes_3d"][b], ref[b]["gt_bboxes_3d"])
    assert sum_dropout_counts(batch["metas"]) == _counts(dropped_cameras=12)


def test_drop_lidar(converted, plain):
    _, ref = plain
    ds = _dataset(converted, drop_sensors={"lidar": True})
    for i in range(len(ds)):
        s = ds[i]
        assert s["points"].shape == (0, 5) and s["points"].dtype == torch.float32
        assert s["camera_mask"].all()
        _assert_same_except(s, ref[i], skip=("points",))  # images and GT unchanged
        assert s["metas"]["dropped"] == {"cameras": [], "lidar": True, "sweeps": 0,
                                         "counts": _counts(dropped_lidar=1)}
    batch = next(iter(build_dataloader(ds, samples_per_gpu=2, shuffle=False)))
    assert [p.shape for p in batch["points"]] == [(0, 5), (0, 5)]


def _keyframe_and_sweeps(info, k, pcr):
    """Keyframe plus the newest k sweeps, computed directly in float64, range-filtered."""
    key = np.fromfile(info["lidar_path"], dtype=np.float32).reshape(-1, 5).astype(np.float64)
    key[:, 4] = 0.0
    clouds = [key]
    for sweep in info["sweeps"][:min(k, SWEEPS_NUM)]:
        pts = np.fromfile(sweep["data_path"], dtype=np.float32).reshape(-1, 5).astype(np.float64)
        pts = pts[~((np.abs(pts[:, 0]) < 1) & (np.abs(pts[:, 1]) < 1))]
        T = make_transform(sweep["sensor2lidar_rotation"], sweep["sensor2lidar_translation"])
        pts[:, :3] = pts[:, :3] @ T[:3, :3].T + T[:3, 3]
        pts[:, 4] = (info["timestamp"] - sweep["timestamp"]) / 1e6
        clouds.append(pts)
    points = np.concatenate(clouds)
    lo, hi = np.asarray(pcr[:3]), np.asarray(pcr[3:])
    return points[np.all((points[:, :3] > lo) & (points[:, :3] < hi), axis=1)]


@pytest.mark.parametrize("k", [0, 3])
def test_max_sweeps_keeps_the_newest(converted, k):
    ds = _dataset(converted, drop_sensors={"max_sweeps": k})
    pcr = load_config(CONFIG).point_cloud_range
    for i in range(len(ds)):
        s = ds[i]
        info = ds.data_infos[i]
        expected = _keyframe_and_sweeps(info, k, pcr)  # k = 0: the keyframe alone, not padded
        assert s["points"].shape == expected.shape
        np.testing.assert_allclose(s["points"].numpy(), expected, atol=1e-4)
        n = len(info["sweeps"])
        dropped = min(n, SWEEPS_NUM) - min(n, k, SWEEPS_NUM)
        assert dropped > 0
        assert s["metas"]["dropped"]["sweeps"] == dropped
        assert s["metas"]["dropped"]["counts"] == _counts(dropped_sweeps=dropped)


def _broken_infos(converted, tmp_path):
    """Val infos with a missing camera file (sample 0), LiDAR keyframe (1) and sweep (2)."""
    infos = sorted(copy.deepcopy(load_pickle(converted[2]["val"])["infos"]), key=lambda i: i["timestamp"])
    infos[0]["cams"]["CAM_BACK"]["data_path"] = "/nowhere/samples/CAM_BACK/gone.jpg"
    infos[1]["lidar_path"] = "/nowhere/samples/LIDAR_TOP/gone.pcd.bin"
    infos[2]["sweeps"][0]["data_path"] = "/nowhere/sweeps/LIDAR_TOP/gone.pcd.bin"
    path = tmp_path / "broken_infos.pkl"
    dump_pickle({"infos": infos, "metadata": {"version": "v1.0-mini"}}, path)
    return infos, path


def test_missing_files_raise_by_default(converted, tmp_path):
    infos, path = _broken_infos(converted, tmp_path)
    ds = _dataset(converted, path)
    for i, name in ((0, "CAM_BACK/gone.jpg"), (1, "LIDAR_TOP/gone.pcd.bin"), (2, "sweeps/LIDAR_TOP/gone.pcd.bin")):
        with pytest.raises(DataFileNotFoundError, match=rf"sample {infos[i]['token']}: file .*{name}.* is missing"):
            ds[i]


def test_missing_files_dropped_and_counted(converted, plain, tmp_path):
    _, ref = plain
    infos, path = _broken_infos(converted, tmp_path)
    ds = _dataset(converted, path, missing_sensors="drop")
    samples = [ds[i] for i in range(len(ds))]
    # sample 0: CAM_BACK is a black stand-in, masked out; everything else as without the missing file
    back = list(ds.camera_names).index("CAM_BACK")
    assert samples[0]["camera_mask"].tolist() == [k != back for k in range(6)]
    torch.testing.assert_close(samples[0]["img"][back], _black(samples[0]["img"][back].shape))
    assert torch.equal(samples[0]["img"][:back], ref[0]["img"][:back])
    _assert_same_except(samples[0], ref[0], skip=("img",))
    # sample 1: no LiDAR at all (nor its sweeps)
    assert samples[1]["points"].shape == (0, 5)
    _assert_same_except(samples[1], ref[1], skip=("points",))
    # sample 2: the same as an info file without that sweep
    fixed = copy.deepcopy(infos)
    fixed[2]["sweeps"] = fixed[2]["sweeps"][1:SWEEPS_NUM]
    fixed_path = tmp_path / "fixed_infos.pkl"
    dump_pickle({"infos": fixed, "metadata": {"version": "v1.0-mini"}}, fixed_path)
    assert torch.equal(samples[2]["points"], _dataset(converted, fixed_path, missing_sensors="drop")[2]["points"])
    _assert_same_except(samples[3], ref[3])
    assert [s["metas"]["dropped"] for s in samples] == [
        {"cameras": ["CAM_BACK"], "lidar": False, "sweeps": 0, "counts": _counts(missing_camera_files=1)},
        {"cameras": [], "lidar": True, "sweeps": 0, "counts": _counts(missing_lidar_files=1)},
        {"cameras": [], "lidar": False, "sweeps": 1, "counts": _counts(missing_sweep_files=1)},
        {"cameras": [], "lidar": False, "sweeps": 0, "counts": _counts()}]
    expected = _counts(missing_camera_files=1, missing_lidar_files=1, missing_sweep_files=1)
    assert ds.dropout_counts == expected
    # with a worker process the dataset in this process counts nothing; the batches' metas do
    ds.reset_dropout_counts()
    loader = build_dataloader(ds, samples_per_gpu=2, workers_per_gpu=1, shuffle=False)
    assert sum_dropout_counts(m for batch in loader for m in batch["metas"]) == expected
    assert ds.dropout_counts == _counts()


@pytest.mark.parametrize("options, message", [
    ({"drop_sensors": {"radar": True}}, r"unknown key\(s\) \['radar'\] \(expected cameras, lidar, max_sweeps\)"),
    ({"drop_sensors": {"cameras": ["CAM_FRONT", "CAM_TOP"]}},
     r"drop_sensors.cameras: unknown camera\(s\) \['CAM_TOP'\] \(this dataset has CAM_FRONT, CAM_FRONT_RIGHT"),
    ({"drop_sensors": {"cameras": "front"}}, r"drop_sensors.cameras: 'front': expected 'all' or a list"),
    ({"drop_sensors": {"lidar": "yes"}}, r"drop_sensors.lidar: expected true or false"),
    ({"drop_sensors": {"max_sweeps": -1}}, r"drop_sensors.max_sweeps: expected an integer >= 0"),
    ({"drop_sensors": {"max_sweeps": 1.5}}, r"drop_sensors.max_sweeps: expected an integer >= 0"),
    ({"drop_sensors": ["lidar"]}, r"drop_sensors: expected a mapping"),
    ({"missing_sensors": "skip"}, r"missing_sensors: 'skip' is not a policy \(expected one of error, drop\)"),
])
def test_bad_dropout_options(converted, options, message):
    root, out = converted[0], converted[1]
    with pytest.raises(ValueError, match=message):
        NuScenesDataset(root, out / "nuscenes_infos_val.pkl", pipeline=[], **options)


def test_object_paste_skips_a_sample_without_lidar():
    from bevfusion.datasets.transforms.object_paste import ObjectPaste

    class NeverCalled:
        def sample_all(self, *args):
            raise AssertionError("pasting into a sample without LiDAR")

    results = {"points": np.zeros((0, 5), np.float32), "gt_bboxes_3d": np.zeros((0, 9)),
               "gt_labels_3d": np.zeros(0, np.int64), "dropped": {"lidar": True}}
    assert ObjectPaste(NeverCalled())(results)["points"].shape == (0, 5)
