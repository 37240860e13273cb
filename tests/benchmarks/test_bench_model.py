"""benchmarks/bench_model.py: its in-memory batch has the layout and geometry of the official test pipeline's,
and the benchmark runs end to end on CPU and writes the shared JSON."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from bevfusion.config import load_config
from bevfusion.structures.boxes import box_corners, points_in_boxes_np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))
import bench_model  # noqa: E402

OFFICIAL = REPO / "configs/nuscenes/det/transfusion/secfpn/camera+lidar/swint_v0p075/convfuser.yaml"
LIGHT = REPO / "configs/nuscenes/synthetic/fusion.yaml"  # the demo's small fusion model (with a map head)


@pytest.fixture(scope="module")
def official_cfg():
    return load_config(OFFICIAL)


@pytest.fixture(scope="module")
def small_batch(official_cfg):
    return bench_model.synthetic_batch(official_cfg, small=True)


def _layout(value, ragged: bool = False):
    """What two batches must share for a key: tensor dtype and shape (a ragged list keeps per-element dtype
    and trailing dims, since point and box counts differ per sample); metas: keys and value types."""
    if isinstance(value, torch.Tensor):
        return ("tensor", value.dtype, tuple(value.shape[1:]) if ragged else tuple(value.shape))
    if isinstance(value, np.ndarray):
        return ("ndarray", value.dtype, value.shape)
    if isinstance(value, dict):
        return ("dict", {k: _layout(v) for k, v in value.items()})
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, len(value), [_layout(v, ragged) for v in value])
    return type(value).__name__


def test_synthetic_batch_matches_the_test_pipeline_on_the_drive(converted, small_batch):
    """Same keys (in order), dtypes and shapes as a drive sample through the official test pipeline + collate;
    the same rig (the drive's calibration comes through the devkit and the info converter); the same
    augmented-image projection (the drive's 400x225 images resized by 4 x 0.48)."""
    from bevfusion.datasets.builder import build_dataset
    from bevfusion.datasets.collate import collate

    root, out, _, _, _ = converted
    cfg = load_config(OFFICIAL, [f"dataset_root={root}/", f"data.test.ann_file={out}/nuscenes_infos_val.pkl",
                                 "augment2d.resize=[[1.6, 1.9], [1.92, 1.92]]"])
    drive = collate([build_dataset(cfg.data.test, "data.test", filter_empty_gt=False)[0]])
    ours = small_batch
    assert list(ours) == list(drive)
    for key in drive:
        ragged = key in ("points", "gt_bboxes_3d", "gt_labels_3d")
        assert _layout(ours[key], ragged) == _layout(drive[key], ragged), key
    assert ours["points"][0].shape[1] == drive["points"][0].shape[1] == 5

    for key in ("lidar2ego", "camera2ego"):
        np.testing.assert_allclose(ours[key].numpy(), drive[key].numpy(), atol=1e-4, err_msg=key)
    # camera2lidar in the infos also holds the ego motion between camera and LiDAR timestamps: rotations
    # agree closely, translations within the ~0.5 m the car moves in half a camera sweep.
    c2l_ours, c2l_drive = ours["camera2lidar"][0].numpy(), drive["camera2lidar"][0].numpy()
    np.testing.assert_allclose(c2l_ours[:, :3, :3], c2l_drive[:, :3, :3], atol=2e-2)
    assert np.abs(c2l_ours[:, :3, 3] - c2l_drive[:, :3, 3]).max() < 0.6
    np.testing.assert_allclose(ours["camera_intrinsics"][0, :, :2, :3].numpy(),
                               4 * drive["camera_intrinsics"][0, :, :2, :3].numpy(), rtol=1e-5)
    for name in ("ours", "drive"):
        b = {"ours": ours, "drive": drive}[name]
        inv = np.linalg.inv(b["lidar2camera"][0].double().numpy())
        np.testing.assert_allclose(inv, b["camera2lidar"][0].double().numpy(), atol=1e-4, err_msg=name)
        np.testing.assert_allclose(b["lidar2image"][0].double().numpy(),
                                   b["camera_intrinsics"][0].double().numpy() @ b["lidar2camera"][0].double().numpy(),
                                   rtol=1e-4, atol=1e-3, err_msg=name)
    # augmented pixel = img_aug @ K @ (camera point): the same map for both (K scaled by 1/4, resize by 4).
    proj_ours = ours["img_aug_matrix"][0].double() @ ours["camera_intrinsics"][0].double()
    proj_drive = drive["img_aug_matrix"][0].double() @ drive["camera_intrinsics"][0].double()
    np.testing.assert_allclose(proj_ours.numpy(), proj_drive.numpy(), rtol=1e-4, atol=1e-2)
    np.testing.assert_array_equal(ours["lidar_aug_matrix"].numpy(), drive["lidar_aug_matrix"].numpy())


def test_synthetic_batch_layout_without_a_drive(official_cfg, small_batch):
    """The layout the model's forward reads (also where the devkit is missing)."""
    b = small_batch
    assert list(b) == ["img", "points", "gt_bboxes_3d", "gt_labels_3d", "gt_masks_bev", "camera_intrinsics",
                       "camera2ego", "lidar2ego", "lidar2camera", "camera2lidar", "lidar2image", "img_aug_matrix",
                       "lidar_aug_matrix", "metas"]
    assert b["img"].shape == (1, 6, 3, 256, 704) and b["img"].dtype == torch.float32
    # normalised: (u / 255 - mean) / std for u uniform in 0..255
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    np.testing.assert_allclose(b["img"][0].mean(dim=(0, 2, 3)).numpy(), (0.5 - mean) / std, atol=0.02)
    for key in ("camera_intrinsics", "camera2ego", "lidar2camera", "camera2lidar", "lidar2image", "img_aug_matrix"):
        assert b[key].shape == (1, 6, 4, 4) and b[key].dtype == torch.float32, key
    assert b["lidar2ego"].shape == b["lidar_aug_matrix"].shape == (1, 4, 4)
    assert b["gt_masks_bev"].shape == (1, 6, 200, 200) and b["gt_masks_bev"].dtype == torch.int64
    assert b["points"][0].dtype == torch.float32 and b["points"][0].shape[1] == 5
    assert b["gt_bboxes_3d"][0].shape[1] == 9 and b["gt_labels_3d"][0].dtype == torch.int64
    # the official test-time image transform: resize 0.48 (1600x900 -> 768x432), bottom rows, centred columns
    expected = np.eye(4)
    expected[0, 0] = expected[1, 1] = 0.48
    expected[0, 3], expected[1, 3] = -(768 - 704) / 2, -(432 - 256)
    np.testing.assert_allclose(b["img_aug_matrix"][0].numpy(), np.broadcast_to(expected, (6, 4, 4)), atol=1e-5)


def test_synthetic_inputs_are_deterministic(official_cfg, small_batch):
    again = bench_model.synthetic_batch(official_cfg, small=True)
    other = bench_model.synthetic_batch(official_cfg, small=True, seed=1)
    for key, value in small_batch.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, again[key]), key
    assert torch.equal(small_batch["points"][0], again["points"][0])
    assert not torch.equal(small_batch["img"], other["img"])
    assert len(small_batch["points"][0]) != len(other["points"][0]) or \
        not torch.equal(small_batch["points"][0], other["points"][0])


def test_points_and_boxes_sit_in_the_lidar_frame(official_cfg, small_batch):
    """Ground hits at the sensor height below the LiDAR, sweeps with their time lags, the range filter, and
    ground-truth boxes that are the scene's obstacles (corners back in the ego frame) and hold points."""
    pts = small_batch["points"][0].double().numpy()
    lo, hi = np.array([-54.0, -54.0, -5.0]), np.array([54.0, 54.0, 3.0])
    assert np.all((pts[:, :3] > lo) & (pts[:, :3] < hi))
    np.testing.assert_allclose(np.unique(pts[:, 4]), [0.0, 0.05], atol=1e-6)
    assert pts[:, 3].min() >= 0 and pts[:, 3].max() <= 255
    assert np.mean(np.abs(pts[:, 2] + 1.84) < 0.1) > 0.2  # the ground: 1.84 m below the sensor

    lidar2ego = small_batch["lidar2ego"][0].double().numpy()
    boxes = small_batch["gt_bboxes_3d"][0].double().numpy()
    labels = small_batch["gt_labels_3d"][0].numpy()
    classes = list(official_cfg.object_classes)
    assert len(boxes) > 10 and set(labels) == {classes.index("car"), classes.index("pedestrian")}
    obstacles = bench_model._scene_boxes(0)
    corners = box_corners(boxes) @ lidar2ego[:3, :3].T + lidar2ego[:3, 3]  # (M, 8, 3) in the ego frame
    aabb = np.concatenate([corners.min(1), corners.max(1)], 1)
    assert np.abs(aabb[:, None] - obstacles[None]).max(-1).min(1).max() < 1e-3

    dense = bench_model.synthetic_points(0, lidar2ego, 0, [-54, -54, -5, 54, 54, 3])  # one full sweep
    inside = points_in_boxes_np(dense[:, :3], boxes, eps=0.05).sum(0)
    assert np.mean(inside > 0) > 0.6, inside


def test_every_camera_sees_lidar_points(small_batch):
    """Project the points with lidar2image and img_aug_matrix, as the depth image does."""
    pts = small_batch["points"][0].double().numpy()[:, :3]
    for c in range(6):
        P = small_batch["lidar2image"][0, c].double().numpy()
        A = small_batch["img_aug_matrix"][0, c].double().numpy()
        cam = pts @ P[:3, :3].T + P[:3, 3]
        front = cam[:, 2] > 1.0
        uv = cam[front, :2] / cam[front, 2:3] @ A[:2, :2].T + A[:2, 3]
        on = (uv[:, 0] >= 0) & (uv[:, 0] < 704) & (uv[:, 1] >= 0) & (uv[:, 1] < 256)
        assert on.sum() > 200, c
        # ground points in view project into the lower part of the image (cameras look ahead, level)
        ground = np.abs(pts[front][on, 2] + 1.84) < 0.1
        assert np.median(uv[on][ground, 1]) > 128, c


def test_benchmark_runs_and_writes_json(tmp_path):
    """The whole script on CPU with the demo's small fusion model (both heads): rows, skips and losses."""
    path = tmp_path / "model.json"
    rc = bench_model.main(["--config", str(LIGHT), "--device", "cpu", "--inputs", "synthetic", "--small",
                           "--dtype", "fp32,fp16", "--runs", "1", "--warmup", "1", "--train-step",
                           "--train-runs", "1", "--train-warmup", "0", "--json", str(path)])
    assert rc == 0
    report = json.loads(path.read_text())
    assert report["benchmark"] == "model" and report["versions"]["torch"] == torch.__version__
    rows = {(r["table"], r["what"], r["dtype"]): r for r in report["rows"]}
    fwd = "model forward, fp32 (TF32 off)"
    total = rows[(fwd, bench_model.END_TO_END, "fp32")]
    assert total["ms"] > 0 and "frames/s" in total["note"]
    assert int(total["note"].split(" boxes out")[0].rsplit(" ", 1)[-1]) > 0
    for part in ("encoders.camera.backbone", "encoders.lidar.backbone", "fuser", "decoder.backbone", "heads.object",
                 "heads.map", "encoders.camera.vtransform.pool (lift + bev_pool)", "heads.object.get_bboxes (decode)"):
        assert rows[(fwd, part, "fp32")]["ms"] > 0, part
    assert any(s["what"] == "model forward, fp16 autocast" for s in report["skipped"])
    train = [r for r in report["rows"] if r["table"].startswith("training step")]
    step = next(r for r in train if r["what"].startswith("train step ("))
    assert step["ms"] > 0 and "losses finite" in step["note"]
    losses = {r["what"]: float(r["note"].split()[1]) for r in train if r["what"].startswith("loss")}
    assert {"loss", "loss/object/loss_heatmap", "loss/map/drivable_area/focal"} <= set(losses), sorted(losses)
    assert all(np.isfinite(v) and v > 0 for v in losses.values())


@pytest.mark.slow
def test_official_model_on_full_synthetic_inputs(official_cfg):
    """The released fusion detector at official resolution on the full synthetic LiDAR: boxes come out."""
    from bevfusion.models import build_model

    batch = bench_model.synthetic_batch(official_cfg)
    assert 200_000 < len(batch["points"][0]) < 350_000
    model = build_model(official_cfg.model).eval()
    with torch.no_grad():
        out = model(batch)
    boxes = out[0]["boxes_3d"]
    assert boxes.shape[1] == 9 and len(boxes) > 0 and torch.isfinite(boxes).all()
