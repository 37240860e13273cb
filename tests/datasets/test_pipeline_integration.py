"""The official train and test pipelines (our configs/nuscenes/default.yaml) on the synthetic drive."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from bevfusion.config import load_config
from bevfusion.datasets.builder import build_dataset
from bevfusion.datasets.loader import CBGSDataset, build_dataloader
from bevfusion.structures.boxes import box_corners
from bevfusion.utils.io import load_pickle

CONFIG = "configs/nuscenes/default.yaml"


def _cfg(root, out, extra=()):
    return load_config(CONFIG, [
        f"dataset_root={root}/",
        f"data.train.dataset.ann_file={out}/nuscenes_infos_train.pkl",
        f"data.val.ann_file={out}/nuscenes_infos_val.pkl",
        f"data.test.ann_file={out}/nuscenes_infos_val.pkl",
        f"train_pipeline.4.db_sampler.info_path={out}/nuscenes_dbinfos_train.pkl",
        f"train_pipeline.4.db_sampler.dataset_root={out}",
        # The fixture's images are 400x225 (not 1600x900): scale the resize range so crops hold image.
        "augment2d.resize=[[1.6, 1.9], [1.76, 1.76]]",
        *extra])


def _project(points_lidar, lidar2image, img_aug):
    """(P, 3) LiDAR-frame points → augmented-image pixels (P, 2) and camera depth (P,)."""
    cam = points_lidar @ lidar2image[:3, :3].T + lidar2image[:3, 3]
    uv = cam[:, :2] / cam[:, 2:3]
    uv = uv @ img_aug[:2, :2].T + img_aug[:2, 3]
    return uv, cam[:, 2]


@pytest.mark.parametrize("seed", range(4))
def test_train_pipeline_keeps_geometry_consistent(converted, seed):
    root, out, written, _, _ = converted
    cfg = _cfg(root, out)
    dataset = build_dataset(cfg.data.train, "data.train", seed=seed)
    assert isinstance(dataset, CBGSDataset)
    base = dataset.dataset
    np.random.seed(seed)
    checked = 0
    for index in range(0, len(base), max(1, len(base) // 4)):
        sample = base[index]
        assert sample["img"].shape == (6, 3, 256, 704) and sample["img"].dtype == torch.float32
        assert sample["points"].shape[1] == 5 and sample["gt_masks_bev"].shape == (6, 200, 200)
        labels = sample["gt_labels_3d"].numpy()
        assert len(labels) and labels.min() >= 0 and labels.max() <= 9
        token = sample["metas"]["token"]
        info = next(i for i in base.data_infos if i["token"] == token)
        orig = {tuple(np.round(b[:3], 2)): b for b in base.get_ann_info(base.data_infos.index(info))["gt_bboxes_3d"]}
        L = sample["lidar_aug_matrix"].double().numpy()
        L_inv = np.linalg.inv(L)
        for box in sample["gt_bboxes_3d"].double().numpy():
            centre = L_inv[:3, :3] @ box[:3] + L_inv[:3, 3]
            match = min(orig, key=lambda k: np.linalg.norm(np.array(k) - centre))
            if np.linalg.norm(np.array(match) - centre) > 0.02:
                continue  # pasted objects have no un-augmented twin
            aug_corners = box_corners(box[None])[0]
            orig_corners = box_corners(orig[match][None])[0]
            for c in range(6):
                P = sample["lidar2image"][c].double().numpy()
                A = sample["img_aug_matrix"][c].double().numpy()
                # Augmented corners through the augmented matrices ...
                uv_aug, depth = _project(aug_corners @ L_inv[:3, :3].T + L_inv[:3, 3], P, A)
                # ... and un-augmented corners through the original calibration, then the image aug.
                uv_ref, _ = _project(orig_corners, P, A)
                ok = (depth > 1.0) & (uv_ref[:, 0] >= 0) & (uv_ref[:, 0] < 704) & (uv_ref[:, 1] >= 0) & \
                    (uv_ref[:, 1] < 256)
                if ok.any():
                    # A flip mirrors the box, so its corners come back in another order: compare as sets.
                    dist = np.linalg.norm(uv_ref[ok][:, None] - uv_aug[None], axis=-1).min(axis=1)
                    assert dist.max() < 1.0
                    checked += 1
    assert checked > 5


def test_test_pipeline_is_deterministic_and_collates(converted):
    root, out, _, _, _ = converted
    cfg = _cfg(root, out)
    dataset = build_dataset(cfg.data.test, "data.test", filter_empty_gt=False)
    a, b = dataset[0], dataset[0]
    assert torch.equal(a["points"], b["points"]) and torch.equal(a["img"], b["img"])
    assert torch.equal(a["lidar_aug_matrix"], torch.eye(4))
    loader = build_dataloader(dataset, samples_per_gpu=2, workers_per_gpu=0, shuffle=False)
    batch = next(iter(loader))
    assert batch["img"].shape == (2, 6, 3, 256, 704) and batch["gt_masks_bev"].shape == (2, 6, 200, 200)
    assert batch["camera_intrinsics"].shape == (2, 6, 4, 4) and len(batch["points"]) == 2
    infos = load_pickle(out / "nuscenes_infos_val.pkl")["infos"]
    assert [m["token"] for m in batch["metas"]] == [i["token"] for i in sorted(infos, key=lambda i: i["timestamp"])][:2]


def test_object_paste_runs_in_the_lidar_config(converted):
    root, out, _, _, _ = converted
    cfg = _cfg(root, out, ["gt_paste_stop_epoch=15"])
    dataset = build_dataset(cfg.data.train, "data.train").dataset
    dataset.set_epoch(0)
    np.random.seed(0)
    counts = [len(dataset[i]["gt_bboxes_3d"]) for i in range(3)]
    dataset.set_epoch(15)
    np.random.seed(0)
    assert sum(len(dataset[i]["gt_bboxes_3d"]) for i in range(3)) < sum(counts)
