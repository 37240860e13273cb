"""Loading, formatting, collate, CBGS and the dataset on a tiny hand-made info file."""
from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from bevfusion.datasets.collate import collate
from bevfusion.datasets.loader import CBGSDataset, build_dataloader, cbgs_indices
from bevfusion.datasets.nuscenes import NuScenesDataset
from bevfusion.datasets.transforms.loading import (
    LoadPointsFromFile,
    LoadPointsFromMultiSweeps,
    load_points,
    resolve_data_path,
    select_sweeps,
)
from bevfusion.structures.boxes import official_to_internal
from bevfusion.structures.geometry import make_transform, yaw_to_quaternion
from bevfusion.utils.io import dump_pickle

CAMS = ("CAM_FRONT", "CAM_FRONT_RIGHT", "CAM_FRONT_LEFT", "CAM_BACK", "CAM_BACK_LEFT", "CAM_BACK_RIGHT")


def _write_points(path, points):
    path.parent.mkdir(parents=True, exist_ok=True)
    np.asarray(points, dtype=np.float32).tofile(path)
    return str(path)


def _make_sample(root, rng, index, num_sweeps=3, names=("car", "pedestrian", "movable_object.debris")):
    token = f"sample{index}"
    ts = 1_500_000_000_000_000 + index * 500_000
    lidar_path = _write_points(root / "samples" / "LIDAR_TOP" / f"{token}.pcd.bin",
                               np.c_[rng.uniform(-20, 20, (50, 3)), rng.uniform(0, 1, (50, 1)),
                                     rng.integers(0, 32, (50, 1))])
    sweeps = []
    for s in range(num_sweeps):
        yaw, t = rng.uniform(-0.1, 0.1), rng.uniform(-2, 2, 3)
        T = make_transform(yaw_to_quaternion(yaw), t)
        sweeps.append({
            "data_path": _write_points(root / "sweeps" / "LIDAR_TOP" / f"{token}_{s}.pcd.bin",
                                       np.c_[rng.uniform(-20, 20, (30, 3)), rng.uniform(0, 1, (30, 1)),
                                             np.full((30, 1), 7.0)]),
            "type": "lidar", "sample_data_token": f"{token}_sweep{s}",
            "sensor2ego_translation": [0.9, 0.0, 1.8], "sensor2ego_rotation": [1.0, 0, 0, 0],
            "ego2global_translation": [0, 0, 0], "ego2global_rotation": [1.0, 0, 0, 0],
            "timestamp": ts - 50_000 * (s + 1),
            "sensor2lidar_rotation": T[:3, :3], "sensor2lidar_translation": T[:3, 3],
        })
    cams = {}
    for c, cam in enumerate(CAMS):
        path = root / "samples" / cam / f"{token}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((18, 32, 3), 10 * c + index, dtype=np.uint8)).save(path)
        T = make_transform(yaw_to_quaternion(c), [0.5, 0.0, 1.5])
        cams[cam] = {
            "data_path": str(path), "type": cam, "sample_data_token": f"{token}_{cam}",
            "sensor2ego_translation": [1.0, 0.0, 1.5], "sensor2ego_rotation": list(yaw_to_quaternion(c)),
            "ego2global_translation": [0, 0, 0], "ego2global_rotation": [1.0, 0, 0, 0], "timestamp": ts,
            "sensor2lidar_rotation": T[:3, :3], "sensor2lidar_translation": T[:3, 3],
            "camera_intrinsics": np.array([[20.0, 0, 16], [0, 20.0, 9], [0, 0, 1]]),
        }
    n = len(names)
    return {
        "lidar_path": lidar_path, "token": token, "sweeps": sweeps, "cams": cams,
        "lidar2ego_translation": [0.9, 0.0, 1.8], "lidar2ego_rotation": [0.7071, 0, 0, 0.7071],
        "ego2global_translation": [100.0, 200.0, 0.0], "ego2global_rotation": [1.0, 0, 0, 0],
        "timestamp": ts, "location": "boston-seaport",
        "gt_boxes": np.c_[rng.uniform(-10, 10, (n, 3)), rng.uniform(1, 4, (n, 3)), rng.uniform(-3, 3, (n, 1))],
        "gt_names": np.array(names), "gt_velocity": np.array([[1.0, np.nan]] + [[0.5, 0.25]] * (n - 1)),
        "num_lidar_pts": np.array([5, 0, 3][:n]), "num_radar_pts": np.zeros(n, dtype=np.int64),
        "valid_flag": np.array([True, False, True][:n]),
    }


@pytest.fixture
def tiny(tmp_path):
    rng = np.random.default_rng(0)
    infos = [_make_sample(tmp_path, rng, i) for i in (2, 0, 1)]  # out of time order on purpose
    ann = tmp_path / "nuscenes_infos_train.pkl"
    dump_pickle({"infos": infos, "metadata": {"version": "v1.0-mini"}}, ann)
    return tmp_path, ann, infos


def test_load_points_rejects_bad_sizes(tmp_path):
    path = tmp_path / "bad.bin"
    np.arange(7, dtype=np.float32).tofile(path)
    with pytest.raises(ValueError, match=r"sample tok1: point file .*bad.bin has 7 float32 values"):
        load_points(str(path), 5, "tok1")
    assert load_points(str(path), 7).shape == (1, 7)


def test_resolve_data_path(tmp_path):
    real = tmp_path / "root" / "samples" / "LIDAR_TOP" / "a.bin"
    _write_points(real, np.zeros((1, 5)))
    assert resolve_data_path(str(real), None) == str(real)
    moved = "/elsewhere/data/nuscenes/samples/LIDAR_TOP/a.bin"
    assert resolve_data_path(moved, tmp_path / "root") == str(real)
    with pytest.raises(FileNotFoundError, match=r"sample tokX: file .*missing.bin"):
        resolve_data_path("/x/samples/LIDAR_TOP/missing.bin", tmp_path / "root", "tokX")


def test_select_sweeps():
    assert select_sweeps(5, 9, deterministic=False) == [0, 1, 2, 3, 4]
    assert select_sweeps(10, 9, deterministic=True) == list(range(9))
    draws = {tuple(select_sweeps(10, 9, False, np.random.default_rng(s))) for s in range(30)}
    assert len(draws) > 1 and all(len(set(d)) == 9 for d in draws)


def test_multisweep_matches_direct_computation(tiny):
    root, _, infos = tiny
    info = infos[0]
    results = {"lidar_path": info["lidar_path"], "sweeps": info["sweeps"], "timestamp": info["timestamp"] / 1e6,
               "token": info["token"], "test_mode": True}
    LoadPointsFromFile(load_dim=5, use_dim=5)(results)
    LoadPointsFromMultiSweeps(sweeps_num=9, remove_close=True, pad_empty_sweeps=True, test_mode=True)(results)
    points = results["points"]
    # Direct, independent computation in float64.
    key = np.fromfile(info["lidar_path"], dtype=np.float32).reshape(-1, 5).astype(np.float64)
    key[:, 4] = 0
    expected = [key]
    for sweep in info["sweeps"]:
        pts = np.fromfile(sweep["data_path"], dtype=np.float32).reshape(-1, 5).astype(np.float64)
        pts = pts[~((np.abs(pts[:, 0]) < 1) & (np.abs(pts[:, 1]) < 1))]
        homog = np.c_[pts[:, :3], np.ones(len(pts))]
        T = make_transform(sweep["sensor2lidar_rotation"], sweep["sensor2lidar_translation"])
        pts[:, :3] = (T @ homog.T).T[:, :3]
        pts[:, 4] = (info["timestamp"] - sweep["timestamp"]) / 1e6
        expected.append(pts)
    expected = np.concatenate(expected)
    assert points.dtype == np.float32 and points.shape == expected.shape
    np.testing.assert_allclose(points, expected, atol=1e-4)
    assert set(np.round(points[:, 4].astype(np.float64), 4)) == {0.0, 0.05, 0.1, 0.15}


def test_multisweep_pads_when_there_are_no_sweeps(tiny):
    _, _, infos = tiny
    results = {"lidar_path": infos[0]["lidar_path"], "sweeps": [], "timestamp": 1.0, "token": "t"}
    LoadPointsFromFile()(results)
    n = len(results["points"])
    LoadPointsFromMultiSweeps(sweeps_num=3, pad_empty_sweeps=True, remove_close=False)(results)
    assert len(results["points"]) == 4 * n and np.all(results["points"][:, 4] == 0)


def test_dataset_sorts_masks_and_converts(tiny):
    root, ann, infos = tiny
    ds = NuScenesDataset(root, ann, pipeline=[], use_valid_flag=True)
    assert [info["token"] for info in ds.data_infos] == ["sample0", "sample1", "sample2"]
    ann_info = ds.get_ann_info(0)
    src = next(i for i in infos if i["token"] == "sample0")
    assert list(ann_info["gt_names"]) == ["car", "movable_object.debris"]  # valid_flag masks the pedestrian
    np.testing.assert_array_equal(ann_info["gt_labels_3d"], [0, -1])
    expected = official_to_internal(np.c_[src["gt_boxes"], np.nan_to_num(src["gt_velocity"])][[0, 2]])
    np.testing.assert_allclose(ann_info["gt_bboxes_3d"], expected)
    assert not np.isnan(ann_info["gt_bboxes_3d"]).any()
    assert ds.get_cat_ids(0) == [0]
    info = ds.get_data_info(0)
    assert info["camera_names"] == list(CAMS)
    np.testing.assert_allclose(info["lidar2image"], info["camera_intrinsics"] @ info["lidar2camera"])
    np.testing.assert_allclose(info["camera2lidar"] @ info["lidar2camera"], np.tile(np.eye(4), (6, 1, 1)),
                               atol=1e-12)


def test_full_loading_pipeline_and_collate(tiny):
    root, ann, _ = tiny
    pipeline = [
        {"type": "LoadMultiViewImageFromFiles", "to_float32": True},
        {"type": "LoadPointsFromFile", "coord_type": "LIDAR", "load_dim": 5, "use_dim": 5},
        {"type": "LoadPointsFromMultiSweeps", "sweeps_num": 9, "load_dim": 5, "use_dim": 5,
         "pad_empty_sweeps": True, "remove_close": True},
        {"type": "LoadAnnotations3D", "with_bbox_3d": True, "with_label_3d": True},
        {"type": "DefaultFormatBundle3D", "classes": ["car", "pedestrian"]},
        {"type": "Collect3D", "keys": ["img", "points", "gt_bboxes_3d", "gt_labels_3d"]},
    ]
    ds = NuScenesDataset(root, ann, pipeline=pipeline, use_valid_flag=True)
    loader = build_dataloader(ds, samples_per_gpu=2, workers_per_gpu=0, shuffle=False)
    batch = next(iter(loader))
    assert batch["img"].shape == (2, 6, 3, 18, 32) and batch["img"].dtype == torch.uint8
    assert batch["img"][0, 2, 0, 0, 0].item() == 20  # camera order kept (CAM_FRONT_LEFT is third)
    assert batch["camera_intrinsics"].shape == (2, 6, 4, 4) and batch["lidar_aug_matrix"].shape == (2, 4, 4)
    assert isinstance(batch["points"], list) and batch["points"][0].shape[1] == 5
    assert batch["gt_bboxes_3d"][0].shape == (2, 9) and batch["gt_labels_3d"][0].dtype == torch.int64
    assert [m["token"] for m in batch["metas"]] == ["sample0", "sample1"]


def test_missing_files_and_keys_name_the_sample(tiny):
    root, ann, infos = tiny
    pipeline = [{"type": "LoadMultiViewImageFromFiles"}]
    (root / "samples" / "CAM_BACK" / "sample1.jpg").unlink()
    ds = NuScenesDataset(root, ann, pipeline=pipeline, test_mode=True)
    with pytest.raises(FileNotFoundError, match=r"sample sample1: file .*CAM_BACK/sample1.jpg"):
        ds[1]
    broken = [dict(i) for i in infos]
    del broken[1]["cams"]["CAM_FRONT"]["camera_intrinsics"]
    del broken[2]["valid_flag"]
    bad = root / "bad_infos.pkl"
    dump_pickle({"infos": broken, "metadata": {}}, bad)
    with pytest.raises(KeyError, match=r"bad_infos.pkl: sample sample\d (camera CAM_FRONT )?lacks"):
        NuScenesDataset(root, bad, pipeline=[])


def test_val_samples_without_boxes_are_not_replaced(tiny):
    root, ann, _ = tiny
    pipeline = [{"type": "LoadAnnotations3D"}]
    ds = NuScenesDataset(root, ann, pipeline=pipeline, object_classes=["bus"], filter_empty_gt=False)
    assert [ds[i]["token"] for i in range(3)] == ["sample0", "sample1", "sample2"]
    train = NuScenesDataset(root, ann, pipeline=pipeline, object_classes=["bus"])
    with pytest.raises(RuntimeError, match="no sample keeps a labelled box"):
        train[0]


def test_cbgs_against_a_naive_count():
    rng = np.random.default_rng(1)
    cat_ids = [sorted(set(rng.choice(4, rng.integers(1, 3)).tolist())) for _ in range(200)]
    cat_ids += [[0]] * 300  # class 0 dominates
    idx = cbgs_indices(cat_ids, num_classes=5, seed=0)  # class 4 never occurs
    per_class = [sum(c in ids for ids in cat_ids) for c in range(5)]
    total = sum(per_class)
    expected = [int(n * (1 / 5) / (n / total)) for n in per_class if n]
    assert len(idx) == sum(expected)
    start = 0
    for c, n in zip([c for c in range(5) if per_class[c]], expected):
        chunk = idx[start:start + n]
        assert all(c in cat_ids[i] for i in chunk)
        start += n
    # Balance: every present class now occurs in at least ~1/5 of the draws' share.
    counts = Counter(c for i in idx for c in cat_ids[i])
    assert min(counts[c] for c in range(4)) >= 0.8 * total / 5
    np.testing.assert_array_equal(idx, cbgs_indices(cat_ids, 5, seed=0))


def test_cbgs_wraps_a_dataset(tiny):
    root, ann, _ = tiny
    ds = NuScenesDataset(root, ann, pipeline=[], use_valid_flag=False, object_classes=["car", "pedestrian"])
    wrapped = CBGSDataset(ds, seed=0)
    expected = cbgs_indices([ds.get_cat_ids(i) for i in range(len(ds))], 2, seed=0)
    assert len(wrapped) == len(expected) > 0 and wrapped.object_classes == ds.object_classes
    assert [wrapped[i]["token"] for i in range(len(wrapped))] == [ds[int(j)]["token"] for j in expected]


def test_collate_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="img"):
        collate([{"img": torch.zeros(6, 3, 4, 4)}, {"img": torch.zeros(6, 3, 4, 5)}])
    with pytest.raises(ValueError, match="empty"):
        collate([])


def test_test_mode_keeps_annotations_when_present(tiny):
    root, ann, infos = tiny
    pipeline = [{"type": "LoadAnnotations3D", "with_bbox_3d": True, "with_label_3d": True,
                 "with_attr_label": False}]
    ds = NuScenesDataset(root, ann, pipeline=pipeline, test_mode=True)
    assert len(ds[0]["gt_bboxes_3d"]) == 2  # num_lidar_pts > 0 masks in test mode
    stripped = [{k: v for k, v in i.items() if not k.startswith(("gt_", "num_", "valid"))} for i in infos]
    test_file = root / "nuscenes_infos_test.pkl"
    dump_pickle({"infos": stripped, "metadata": {"version": "v1.0-test"}}, test_file)
    test_ds = NuScenesDataset(root, test_file, pipeline=pipeline, test_mode=True)
    assert test_ds[0]["gt_bboxes_3d"].shape == (0, 9)
    with pytest.raises(KeyError, match="lacks info keys"):
        NuScenesDataset(root, test_file, pipeline=pipeline, test_mode=False)


def test_build_dataset_wraps_cbgs(tiny):
    from bevfusion.datasets.builder import build_dataset
    from bevfusion.registry import RegistryError

    root, ann, _ = tiny
    cfg = {"type": "CBGSDataset", "dataset": {
        "type": "NuScenesDataset", "dataset_root": str(root), "ann_file": str(ann), "pipeline": [],
        "object_classes": ["car", "pedestrian"], "map_classes": ["divider"], "modality": {"use_lidar": True},
        "test_mode": False, "use_valid_flag": False, "box_type_3d": "LiDAR"}}
    ds = build_dataset(cfg)
    assert isinstance(ds, CBGSDataset) and ds.dataset.map_classes == ("divider",)
    with pytest.raises(RegistryError, match=r"data.train.dataset: unknown key ann_fle"):
        build_dataset({"type": "CBGSDataset", "dataset": {"type": "NuScenesDataset", "dataset_root": ".",
                                                          "ann_fle": "x"}})


def test_every_registered_transform_resolves():
    from bevfusion.datasets.pipeline import TRANSFORMS

    for name in TRANSFORMS.names():
        assert callable(TRANSFORMS.get(name)), name


class _RandomDraws(torch.utils.data.Dataset):
    """Returns its index and a draw from numpy's global state (as augmentations consume it)."""

    def __len__(self):
        return 12

    def __getitem__(self, i):
        return {"index": torch.tensor(i), "draw": torch.tensor(np.random.rand())}


def test_ddp_samplers_split_the_data():
    seen = []
    for rank in range(2):
        loader = build_dataloader(_RandomDraws(), samples_per_gpu=2, shuffle=True, seed=3, rank=rank, world_size=2)
        seen.append([int(i) for b in loader for i in b["index"]])
    assert len(seen[0]) == len(seen[1]) == 6
    assert sorted(seen[0] + seen[1]) == list(range(12))


def test_worker_seeding_is_reproducible_and_distinct():
    def run(epochs=2):
        torch.manual_seed(0)  # what the trainer does once at start-up
        loader = build_dataloader(_RandomDraws(), samples_per_gpu=1, workers_per_gpu=2, shuffle=True, seed=7)
        return [[(int(b["index"]), float(b["draw"])) for b in loader] for _ in range(epochs)]

    first, second = run(), run()
    assert first == second  # same seeds: same order and same augmentation draws
    draws = [d for _, d in first[0]]
    assert len(set(draws)) == len(draws)  # the two workers do not repeat each other's draws
    assert not set(draws) & {d for _, d in first[1]}  # the next epoch draws anew
