"""GeneralizedLSSFPN (facts §2.4): keys/shapes, official shapes from Swin-T outputs, numerics."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from bevfusion.models.camera.necks import GeneralizedLSSFPN


CFG = dict(in_channels=[192, 384, 768], out_channels=256, start_level=0, num_outs=3,
           norm_cfg={"type": "BN2d", "requires_grad": True}, act_cfg={"type": "ReLU", "inplace": True},
           upsample_cfg={"mode": "bilinear", "align_corners": False})


def bn(prefix, c):
    return {f"{prefix}.weight": (c,), f"{prefix}.bias": (c,), f"{prefix}.running_mean": (c,),
            f"{prefix}.running_var": (c,), f"{prefix}.num_batches_tracked": ()}


def test_keys_shapes_count():
    neck = GeneralizedLSSFPN(**CFG)
    exp = {"lateral_convs.0.conv.weight": (256, 448, 1, 1), **bn("lateral_convs.0.bn", 256),
           "lateral_convs.1.conv.weight": (256, 1152, 1, 1), **bn("lateral_convs.1.bn", 256),
           "fpn_convs.0.conv.weight": (256, 256, 3, 3), **bn("fpn_convs.0.bn", 256),
           "fpn_convs.1.conv.weight": (256, 256, 3, 3), **bn("fpn_convs.1.bn", 256)}
    assert {k: tuple(v.shape) for k, v in neck.state_dict().items()} == exp
    assert sum(p.numel() for p in neck.parameters()) == 256 * (448 + 1152 + 2 * 9 * 256) + 4 * 512 == 1_591_296


@torch.no_grad()
def test_official_shapes():
    """Swin-T outputs of 6 images at 256×704 → [6, 256, 32, 88] and [6, 256, 16, 44] (facts §2.2)."""
    neck = GeneralizedLSSFPN(**CFG).eval()
    xs = [torch.randn(6, 192, 32, 88), torch.randn(6, 384, 16, 44), torch.randn(6, 768, 8, 22)]
    outs = neck(xs)
    assert isinstance(outs, tuple) and [tuple(o.shape) for o in outs] == [(6, 256, 32, 88), (6, 256, 16, 44)]


def _cbr(x, m, padding):
    b = m.bn
    y = F.conv2d(x, m.conv.weight, m.conv.bias, padding=padding)
    y = (y - b.running_mean[:, None, None]) / torch.sqrt(b.running_var[:, None, None] + b.eps)
    return F.relu(y * b.weight[:, None, None] + b.bias[:, None, None])


@torch.no_grad()
def test_matches_manual_top_down_pass():
    torch.manual_seed(0)
    neck = GeneralizedLSSFPN(in_channels=[4, 6, 8], out_channels=5, num_outs=3,
                             upsample_cfg={"mode": "bilinear", "align_corners": False}).eval()
    for mod in neck.modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.running_mean.uniform_(-1, 1)
            mod.running_var.uniform_(0.5, 2)
            mod.weight.data.uniform_(0.5, 1.5)
            mod.bias.data.uniform_(-0.5, 0.5)
    assert all(m.conv.bias is None for m in neck.lateral_convs)
    x0, x1, x2 = torch.randn(2, 4, 12, 20), torch.randn(2, 6, 6, 10), torch.randn(2, 8, 3, 5)
    up = lambda t, ref: F.interpolate(t, size=ref.shape[2:], mode="bilinear", align_corners=False)  # noqa: E731
    l1 = _cbr(_cbr(torch.cat([x1, up(x2, x1)], 1), neck.lateral_convs[1], 0), neck.fpn_convs[1], 1)
    l0 = _cbr(_cbr(torch.cat([x0, up(l1, x0)], 1), neck.lateral_convs[0], 0), neck.fpn_convs[0], 1)
    o0, o1 = neck([x0, x1, x2])
    torch.testing.assert_close(o1, l1, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(o0, l0, rtol=1e-5, atol=1e-5)
    # inputs are not modified in place (ReLU inplace is off inside, as upstream)
    assert x0.shape == (2, 4, 12, 20)


def test_conv_init_is_mmcv_kaiming_fan_out():
    torch.manual_seed(0)
    neck = GeneralizedLSSFPN(**CFG)
    w = neck.fpn_convs[0].conv.weight
    expected_std = (2.0 / (256 * 9)) ** 0.5  # kaiming normal, fan_out = Cout·k·k, ReLU gain
    assert abs(float(w.detach().std()) / expected_std - 1) < 0.02
    assert float(neck.fpn_convs[0].bn.weight.detach().min()) == 1.0
