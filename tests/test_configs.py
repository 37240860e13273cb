"""Our config tree: every file loads, and the resolved values are the official ones (facts §1.6)."""
from __future__ import annotations

from pathlib import Path

import pytest

from bevfusion.config import load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
ALL = sorted(p for p in CONFIGS.rglob("*.yaml"))
FUSION_DET = CONFIGS / "nuscenes/det/transfusion/secfpn/camera+lidar/swint_v0p075/convfuser.yaml"
LIDAR_DET = CONFIGS / "nuscenes/det/transfusion/secfpn/lidar/voxelnet_0p075.yaml"
CAMERA_DET = CONFIGS / "nuscenes/det/centerhead/lssfpn/camera/256x704/swint/default.yaml"
FUSION_SEG = CONFIGS / "nuscenes/seg/fusion-bev256d2-lss.yaml"
CAMERA_SEG = CONFIGS / "nuscenes/seg/camera-bev256d2.yaml"
LIDAR_SEG = CONFIGS / "nuscenes/seg/lidar-centerpoint-bev128.yaml"


@pytest.mark.parametrize("path", ALL, ids=[str(p.relative_to(CONFIGS)) for p in ALL])
def test_every_config_loads(path):
    cfg = load_config(path)
    assert cfg.seed == 0 and cfg.runner.max_epochs == cfg.max_epochs


def test_fusion_detection():
    cfg = load_config(FUSION_DET)
    m = cfg.model
    assert cfg.voxel_size == [0.075, 0.075, 0.2] and cfg.point_cloud_range == [-54.0, -54.0, -5.0, 54.0, 54.0, 3.0]
    assert m.encoders.camera.backbone.type == "SwinTransformer" and m.encoders.camera.backbone.drop_path_rate == 0.2
    vt = m.encoders.camera.vtransform
    assert vt.type == "DepthLSSTransform" and vt.xbound == [-54.0, 54.0, 0.3] and vt.feature_size == [32, 88]
    assert m.encoders.lidar.backbone.sparse_shape == [1440, 1440, 41]
    assert m.encoders.lidar.voxelize.max_voxels == [120000, 160000]
    assert m.fuser.in_channels == [80, 256] and m.heads.object.in_channels == 512 and m.heads.map is None
    assert m.heads.object.test_cfg.grid_size == [1440, 1440, 41]
    assert m.heads.object.bbox_coder.voxel_size == [0.075, 0.075]
    assert cfg.optimizer.lr == 2.0e-4 and cfg.max_epochs == 6
    assert cfg.lr_config.policy == "CosineAnnealing" and cfg.momentum_config.policy == "cyclic"


def test_lidar_detection():
    cfg = load_config(LIDAR_DET)
    assert cfg.model.encoders.camera is None and cfg.model.fuser is None
    assert cfg.gt_paste_stop_epoch == 15 and cfg.max_epochs == 20 and cfg.optimizer.lr == 1.0e-4
    paste = next(t for t in cfg.data.train.dataset.pipeline if t.type == "ObjectPaste")
    assert paste.stop_epoch == 15 and paste.db_sampler.info_path == "data/nuscenes/nuscenes_dbinfos_train.pkl"


def test_camera_detection():
    cfg = load_config(CAMERA_DET)
    m = cfg.model
    assert m.encoders.lidar is None and m.heads.object.type == "CenterHead"
    vt = m.encoders.camera.vtransform
    assert vt.type == "LSSTransform" and vt.xbound == [-51.2, 51.2, 0.4] and vt.dbound == [1.0, 60.0, 0.5]
    assert m.decoder.backbone.in_channels == 80 and m.decoder.neck.in_channels == [512, 128]
    assert cfg.augment3d.translate == 0 and cfg.data.samples_per_gpu == 6
    assert cfg.optimizer.paramwise_cfg.custom_keys["encoders.camera.backbone"].lr_mult == 0.1
    assert cfg.lr_config.target_ratio == 5.0
    assert m.heads.object.test_cfg.nms_type[0] == "circle"


@pytest.mark.parametrize("path,camera,lidar,head_in", [
    (FUSION_SEG, True, True, 512), (CAMERA_SEG, True, False, 256), (LIDAR_SEG, False, True, 512)])
def test_segmentation(path, camera, lidar, head_in):
    m = load_config(path).model
    assert (m.encoders.camera is not None) == camera and (m.encoders.lidar is not None) == lidar
    assert m.heads.object is None and m.heads.map.in_channels == head_in
    assert m.heads.map.classes[-1] == "divider" and m.heads.map.loss == "focal"
    if camera:
        assert m.encoders.camera.backbone.drop_path_rate == 0.3
        assert m.encoders.camera.vtransform.type == "LSSTransform"
