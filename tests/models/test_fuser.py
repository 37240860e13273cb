"""ConvFuser: official keys (an nn.Sequential, `fuser.0`/`fuser.1`), shapes and numerics."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bevfusion.models.fusers import ConvFuser


def test_convfuser_keys_shapes_count():
    m = ConvFuser(in_channels=[80, 256], out_channels=256)
    assert isinstance(m, nn.Sequential)
    exp = {"0.weight": (256, 336, 3, 3), "1.weight": (256,), "1.bias": (256,), "1.running_mean": (256,),
           "1.running_var": (256,), "1.num_batches_tracked": ()}
    assert {k: tuple(v.shape) for k, v in m.state_dict().items()} == exp
    assert sum(p.numel() for p in m.parameters()) == 256 * 336 * 9 + 512 == 774_656
    assert m[1].eps == 1e-5 and m[1].momentum == 0.1
    wrapper = nn.Module()
    wrapper.fuser = m
    assert "fuser.0.weight" in wrapper.state_dict()


@torch.no_grad()
def test_convfuser_official_resolution_and_math():
    """Fusion det: camera [1, 80, 180, 180] + LiDAR [1, 256, 180, 180] → [1, 256, 180, 180]."""
    torch.manual_seed(0)
    m = ConvFuser(in_channels=[80, 256], out_channels=256).eval()
    m[1].running_mean.uniform_(-1, 1)
    m[1].running_var.uniform_(0.5, 2)
    cam, lidar = torch.randn(1, 80, 180, 180), torch.randn(1, 256, 180, 180)
    y = m([cam, lidar])
    assert tuple(y.shape) == (1, 256, 180, 180)
    # numerics on a crop (the conv is local): camera channels first, then LiDAR
    c, l = cam[..., :12, :12], lidar[..., :12, :12]
    ref = F.conv2d(torch.cat([c, l], 1), m[0].weight, padding=1)
    ref = F.relu((ref - m[1].running_mean[:, None, None]) / torch.sqrt(m[1].running_var[:, None, None] + 1e-5))
    torch.testing.assert_close(y[..., 1:11, 1:11], ref[..., 1:11, 1:11], rtol=1e-4, atol=1e-4)
