"""Every official config builds a whole model, and a fake official checkpoint converts and loads strictly."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bevfusion.config import load_config
from bevfusion.models import build_model
from bevfusion.models.convert import _sparse_convs
from bevfusion.ops.sparse.convert import to_spconv1
from bevfusion.registry import RegistryError

REPO = Path(__file__).resolve().parents[2]
NUSCENES = REPO / "configs" / "nuscenes"
# Leaf configs of the official tree (a default.yaml is a leaf where upstream trains from it).
LEAVES = {
    "det/transfusion/secfpn/camera+lidar/swint_v0p075/convfuser.yaml": {"camera", "lidar", "fuser", "object"},
    "det/transfusion/secfpn/lidar/voxelnet_0p075.yaml": {"lidar", "object"},
    "det/transfusion/secfpn/lidar/voxelnet.yaml": {"lidar", "object"},
    "det/centerhead/lssfpn/camera/256x704/swint/default.yaml": {"camera", "object"},
    "seg/fusion-bev256d2-lss.yaml": {"camera", "lidar", "fuser", "map"},
    "seg/camera-bev256d2.yaml": {"camera", "map"},
    "seg/lidar-centerpoint-bev128.yaml": {"lidar", "map"},
}


def _parts(model):
    parts = set(model.encoders.keys()) | set(model.heads.keys())
    return parts | ({"fuser"} if model.fuser is not None else set())


@pytest.mark.parametrize("leaf", sorted(LEAVES))
def test_official_config_builds(leaf):
    cfg = load_config(NUSCENES / leaf)
    model = build_model(cfg.model)  # offline: the Swin URL in init_cfg is only warned about
    assert _parts(model) == LEAVES[leaf]
    prefixes = {k.split(".")[0] for k in model.state_dict()}
    assert prefixes <= {"encoders", "fuser", "decoder", "heads"}


def test_pointpillars_fails_with_its_config_path():
    cfg = load_config(NUSCENES / "det/transfusion/secfpn/lidar/pointpillars.yaml")
    with pytest.raises(RegistryError, match=r"model.encoders.lidar.backbone: unknown bevfusion type 'PointPillarsEncoder'"):
        build_model(cfg.model)


def test_fake_official_checkpoint_converts_and_loads_strictly(tmp_path):
    """An official-layout checkpoint of the LiDAR-only detector (spconv-1 sparse weights, mmcv meta, DDP
    prefix) goes through tools/convert_checkpoint.py and loads strictly with identical values."""
    config = NUSCENES / "det/transfusion/secfpn/lidar/voxelnet_0p075.yaml"
    torch.manual_seed(0)
    model = build_model(load_config(config).model)
    for p in model.parameters():
        p.data.normal_()
    official = {k: v.clone() for k, v in model.state_dict().items()}
    for key, conv in _sparse_convs(model).items():
        official[key] = to_spconv1(official[key], conv.kernel_size)  # (kx, ky, kz, Cin, Cout)
    assert official["encoders.lidar.backbone.conv_input.0.weight"].shape == (3, 3, 3, 5, 16)
    src = tmp_path / "lidar-only-det.pth"
    torch.save({"meta": {"mmcv_version": "1.4.0", "epoch": 20}, "state_dict": official}, src)
    dst = tmp_path / "converted.pth"
    proc = subprocess.run([sys.executable, "tools/convert_checkpoint.py", str(config), str(src), str(dst)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "all keys matched" in proc.stderr
    loaded = torch.load(dst, weights_only=True)["state_dict"]
    fresh = build_model(load_config(config).model)
    fresh.load_state_dict(loaded, strict=True)
    for k, v in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k
    # A checkpoint with a wrong key fails and names it.
    official["heads.object.extra.weight"] = torch.zeros(1)
    torch.save({"state_dict": official}, src)
    proc = subprocess.run([sys.executable, "tools/convert_checkpoint.py", str(config), str(src), str(dst)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1 and "unexpected: heads.object.extra.weight" in proc.stderr
