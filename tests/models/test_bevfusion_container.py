"""BEVFusion container wiring with toy parts: module tree, key prefixes, loss names, eval records."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from bevfusion.models import build_model
from bevfusion.registry import REGISTRY, RegistryError


class ToyBackbone(nn.Module):
    def __init__(self, out_channels: int = 4):
        super().__init__()
        self.conv = nn.Conv2d(3, out_channels, 3, stride=4, padding=1)

    def forward(self, x):
        return [self.conv(x)]


class ToyNeck(nn.Module):
    def __init__(self, channels: int = 4):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 1)

    def forward(self, xs):
        return [self.conv(xs[0])]


class ToyVTransform(nn.Module):
    """Mean over cameras and a resize to the BEV grid; records the geometry it was given."""

    def __init__(self, channels: int = 4, size: int = 8):
        super().__init__()
        self.size, self.proj = size, nn.Conv2d(channels, channels, 1)

    def forward(self, x, points, camera2ego, lidar2ego, lidar2camera, lidar2image, camera_intrinsics,
                camera2lidar, img_aug_matrix, lidar_aug_matrix, metas):
        assert camera2ego.shape[-2:] == (4, 4) and lidar_aug_matrix.shape[-2:] == (4, 4)
        x = nn.functional.interpolate(x.mean(1), size=(self.size, self.size))
        return self.proj(x)


class ToyVoxelization(nn.Module):
    def __init__(self, max_num_points: int, voxel_size, point_cloud_range, max_voxels):
        super().__init__()
        self.voxel_size = voxel_size

    def forward(self, points):
        coords = (points[:, :3] / self.voxel_size[0]).floor().int().clamp(0, 7)
        coords, inverse = torch.unique(coords, dim=0, return_inverse=True)
        voxels = torch.zeros(len(coords), 1, points.shape[1]).index_add_(0, inverse, points[:, None])
        counts = torch.zeros(len(coords), dtype=torch.int32).index_add_(0, inverse, torch.ones_like(inverse,
                                                                                                   dtype=torch.int32))
        return voxels, coords, counts


class ToyLidarBackbone(nn.Module):
    def __init__(self, in_channels: int = 5, out_channels: int = 4):
        super().__init__()
        self.linear = nn.Linear(in_channels, out_channels)

    def forward(self, feats, coords, batch_size, sizes=None):
        out = torch.zeros(batch_size, 8, 8, 8, self.linear.out_features)
        out[coords[:, 0].long(), coords[:, 1].long(), coords[:, 2].long(), coords[:, 3].long()] = self.linear(feats)
        return out.sum(3).permute(0, 3, 1, 2)


class ToyFuser(nn.Sequential):
    def __init__(self, in_channels, out_channels):
        super().__init__(nn.Conv2d(sum(in_channels), out_channels, 1))

    def forward(self, xs):
        return super().forward(torch.cat(xs, dim=1))


class ToyDecoder(nn.Module):
    def __init__(self, channels: int = 4):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 1)

    def forward(self, x):
        return [self.conv(x if isinstance(x, torch.Tensor) else x[0])]


class ToyObjectHead(nn.Module):
    def __init__(self, in_channels: int = 4):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, 9, 1)

    def forward(self, x, metas):
        return self.conv(x)

    def loss(self, gt_bboxes_3d, gt_labels_3d, preds):
        return {"box": preds.abs().mean(), "num_gt": torch.tensor(float(sum(len(b) for b in gt_bboxes_3d)))}

    def get_bboxes(self, preds, metas):
        return [(p.flatten(1).T[:3], torch.ones(3), torch.zeros(3, dtype=torch.long)) for p in preds]


class ToyMapHead(nn.Module):
    def __init__(self, in_channels: int = 4, classes=("a", "b")):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, len(classes), 1)

    def forward(self, x, target=None):
        logits = self.conv(x)
        if target is None:
            return logits.sigmoid()
        return {"a/focal": nn.functional.binary_cross_entropy_with_logits(logits, target.float())}


TOYS = {c.__name__: c for c in (ToyBackbone, ToyNeck, ToyVTransform, ToyLidarBackbone, ToyFuser, ToyDecoder,
                                 ToyObjectHead, ToyMapHead)}


@pytest.fixture(autouse=True)
def toy_registry():
    with REGISTRY.registered({**TOYS, "Voxelization": ToyVoxelization}):
        yield


def _config(camera=True, lidar=True, obj=True, seg=True):
    return {
        "type": "BEVFusion",
        "encoders": {
            "camera": {"backbone": {"type": "ToyBackbone"}, "neck": {"type": "ToyNeck"},
                       "vtransform": {"type": "ToyVTransform"}} if camera else None,
            "lidar": {"voxelize": {"max_num_points": 10, "voxel_size": [1.0, 1.0, 1.0],
                                   "point_cloud_range": [0, 0, 0, 8, 8, 8], "max_voxels": [100, 100]},
                      "backbone": {"type": "ToyLidarBackbone"}} if lidar else None,
        },
        "fuser": {"type": "ToyFuser", "in_channels": [4, 4], "out_channels": 4} if camera and lidar else None,
        "decoder": {"backbone": {"type": "ToyDecoder"}, "neck": {"type": "ToyDecoder"}},
        "heads": {"object": {"type": "ToyObjectHead"} if obj else None,
                  "map": {"type": "ToyMapHead"} if seg else None},
    }


def _batch(b=2):
    eye = torch.eye(4)
    return {
        "img": torch.randn(b, 6, 3, 16, 16),
        "points": [torch.rand(20, 5) * 8 for _ in range(b)],
        **{k: eye.expand(b, 6, 4, 4) for k in ("camera2ego", "lidar2camera", "lidar2image", "camera_intrinsics",
                                              "camera2lidar", "img_aug_matrix")},
        "lidar2ego": eye.expand(b, 4, 4), "lidar_aug_matrix": eye.expand(b, 4, 4),
        "gt_bboxes_3d": [torch.zeros(3, 9), torch.zeros(1, 9)][:b], "gt_labels_3d": [torch.zeros(3), torch.zeros(1)][:b],
        "gt_masks_bev": torch.randint(0, 2, (b, 2, 8, 8)),
        "metas": [{"token": f"s{i}"} for i in range(b)],
    }


@pytest.mark.parametrize("camera,lidar", [(True, True), (True, False), (False, True)])
def test_variants_train_and_predict(camera, lidar):
    model = build_model(_config(camera, lidar))
    prefixes = {k.split(".")[0] + "." + k.split(".")[1] for k in model.state_dict()}
    assert ("encoders.camera" in prefixes) == camera and ("encoders.lidar" in prefixes) == lidar
    assert {"decoder.backbone", "decoder.neck", "heads.object", "heads.map"} <= prefixes
    assert ("fuser.0" in prefixes) == (camera and lidar)
    model.train()
    losses = model(_batch())
    assert set(losses) == {"loss/object/box", "stats/object/num_gt", "loss/map/a/focal"}
    assert losses["stats/object/num_gt"].item() == 4.0
    sum(v for k, v in losses.items() if "loss" in k).backward()
    model.eval()
    with torch.no_grad():
        out = model(_batch())
    assert len(out) == 2 and set(out[0]) == {"boxes_3d", "scores_3d", "labels_3d", "masks_bev"}
    assert out[0]["boxes_3d"].shape == (3, 9) and out[0]["masks_bev"].shape == (2, 8, 8)


def test_loss_scale_and_single_head():
    cfg = _config(obj=False)
    cfg["loss_scale"] = {"map": 0.5}
    model = build_model(cfg).train()
    batch = _batch()
    scaled = model(batch)["loss/map/a/focal"]
    model.loss_scale["map"] = 1.0
    assert torch.allclose(scaled, 0.5 * model(batch)["loss/map/a/focal"])


def test_config_errors_name_their_path():
    cfg = _config()
    cfg["encoders"]["camera"]["neck"] = {"type": "ToyNek"}
    with pytest.raises(RegistryError, match=r"model.encoders.camera.neck: unknown bevfusion type 'ToyNek'"):
        build_model(cfg)
    cfg = _config()
    cfg["fuser"]["in_channel"] = 3
    with pytest.raises(RegistryError, match=r"model.fuser: unknown key in_channel"):
        build_model(cfg)
    with pytest.raises(ValueError, match="two encoders need a fuser"):
        build_model({**_config(), "fuser": None})
    with pytest.raises(ValueError, match="at least one of object and map"):
        build_model(_config(obj=False, seg=False))


def test_errors_name_the_full_path_of_nested_sections():
    cfg = _config()
    cfg["encoders"]["camera"]["nek"] = cfg["encoders"]["camera"].pop("neck")
    with pytest.raises(RegistryError, match=r"^model.encoders.camera: unknown key nek"):
        build_model(cfg)
    cfg = _config()
    cfg["loss_scale"] = {"mapp": 2.0}
    with pytest.raises(RegistryError, match=r"^model.loss_scale: no head named mapp"):
        build_model(cfg)


def test_model_from_finished_modules_equals_the_built_one():
    """BEVFusion takes modules; from_config is only the way to build them from a config section."""
    from bevfusion.models import build_decoder
    from bevfusion.models.bevfusion import BEVFusion, CameraEncoder, LidarEncoder

    torch.manual_seed(0)
    built = build_model(_config()).eval()
    torch.manual_seed(0)
    by_hand = BEVFusion(
        camera=CameraEncoder(ToyBackbone(), ToyNeck(), ToyVTransform()),
        lidar=LidarEncoder(ToyVoxelization(10, [1.0, 1.0, 1.0], [0, 0, 0, 8, 8, 8], [100, 100]), ToyLidarBackbone()),
        fuser=ToyFuser([4, 4], 4),
        decoder=build_decoder({"backbone": {"type": "ToyDecoder"}, "neck": {"type": "ToyDecoder"}}),
        heads={"object": ToyObjectHead(), "map": ToyMapHead()}).eval()
    assert list(built.state_dict()) == list(by_hand.state_dict())
    by_hand.load_state_dict(built.state_dict())
    batch = _batch()
    with torch.no_grad():
        a, b = built(batch), by_hand(batch)
    for x, y in zip(a, b):
        for key in x:
            assert torch.equal(x[key], y[key]), key


class InitRecordingBackbone(ToyBackbone):
    calls = 0

    def init_weights(self):
        type(self).calls += 1


def test_init_weights_can_be_left_out():
    """A model whose checkpoint is loaded right after skips the camera backbone's own init (and so the
    warning about a pretrained URL that is never downloaded)."""
    cfg = _config()
    cfg["encoders"]["camera"]["backbone"] = {"type": "InitRecordingBackbone"}
    with REGISTRY.registered({"InitRecordingBackbone": InitRecordingBackbone}):
        InitRecordingBackbone.calls = 0
        build_model(cfg)
        assert InitRecordingBackbone.calls == 1
        build_model(cfg, init_weights=False)
        assert InitRecordingBackbone.calls == 1
