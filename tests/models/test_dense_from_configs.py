"""The dense model parts build from the official config sections unchanged (keys straight from the YAML),
and each part's parameter count equals the count derived from the facts-sheet key tables."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bevfusion.config import load_config
from bevfusion.models.camera.backbones.swin import SwinTransformer
from bevfusion.models.camera.necks import GeneralizedLSSFPN
from bevfusion.models.decoder.resnet import GeneralizedResNet, LSSFPN
from bevfusion.models.decoder.second import SECOND
from bevfusion.models.decoder.secondfpn import SECONDFPN
from bevfusion.models.fusers import ConvFuser
from bevfusion.models.heads.segm import BEVSegmentationHead
from bevfusion.registry import check_kwargs

ROOT = Path(__file__).resolve().parents[2]
CLASSES = {"SwinTransformer": SwinTransformer, "GeneralizedLSSFPN": GeneralizedLSSFPN, "ConvFuser": ConvFuser,
           "SECOND": SECOND, "SECONDFPN": SECONDFPN, "GeneralizedResNet": GeneralizedResNet, "LSSFPN": LSSFPN,
           "BEVSegmentationHead": BEVSegmentationHead}

# config → {section path: expected trainable parameter count} (counts from the §2.4 tables, see the
# per-module tests and docs/COMPATIBILITY.md)
CASES = {
    "configs/nuscenes/det/transfusion/secfpn/camera+lidar/swint_v0p075/convfuser.yaml": {
        "encoders.camera.backbone": 27_520_506, "encoders.camera.neck": 1_591_296, "fuser": 774_656,
        "decoder.backbone": 4_280_832, "decoder.neck": 295_936},
    "configs/nuscenes/det/centerhead/lssfpn/camera/256x704/swint/default.yaml": {
        "encoders.camera.backbone": 27_520_506, "encoders.camera.neck": 1_591_296,
        "decoder.backbone": 11_039_488, "decoder.neck": 1_345_024},
    "configs/nuscenes/seg/fusion-bev256d2-lss.yaml": {
        "fuser": 774_656, "decoder.backbone": 4_280_832, "decoder.neck": 295_936, "heads.map": 4_723_718},
    "configs/nuscenes/seg/camera-bev256d2.yaml": {
        "decoder.backbone": 17_214_400, "decoder.neck": 1_385_984, "heads.map": 1_182_214},
}


def _plain(x):
    if hasattr(x, "items"):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


def _section(cfg, path):
    for part in path.split("."):
        cfg = cfg[part]
    return _plain(cfg)


@pytest.mark.parametrize("config", list(CASES))
def test_sections_build_with_official_keys(config):
    model = load_config(ROOT / config)["model"]
    for path, count in CASES[config].items():
        section = _section(model, path)
        cls = CLASSES[section.pop("type")]
        check_kwargs(cls, section, f"model.{path}")
        module = cls(**section)
        assert sum(p.numel() for p in module.parameters()) == count, path


def test_swin_drop_path_follows_config():
    seg = _section(load_config(ROOT / "configs/nuscenes/seg/fusion-bev256d2-lss.yaml")["model"], "encoders.camera.backbone")
    seg.pop("type")
    m = SwinTransformer(**seg)
    assert m.stages[3].blocks[1].attn.drop.drop_prob == pytest.approx(0.3)
    assert torch.get_default_dtype() == torch.float32
