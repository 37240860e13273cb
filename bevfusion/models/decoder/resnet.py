"""Camera-only / camera-seg BEV decoder: `GeneralizedResNet` backbone and `LSSFPN` neck.

Both follow the official modules (mmdet3d `backbones/resnet.py`, `necks/lss.py`): the backbone is an
`nn.ModuleList` of mmcv-style BasicBlock stages (keys `{stage}.{block}.conv1.weight`, ..., block 0 with
`downsample.{0,1}`), the neck fuses the last and first stage outputs.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["BasicBlock", "GeneralizedResNet", "LSSFPN", "make_res_layer"]


class BasicBlock(nn.Module):
    """mmcv `BasicBlock`: 3×3 conv (stride) → BN → ReLU → 3×3 conv → BN, + identity/downsample, ReLU."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, dilation: int = 1,
                 downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride=stride, padding=dilation, dilation=dilation, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


def make_res_layer(inplanes: int, planes: int, blocks: int, stride: int = 1, dilation: int = 1) -> nn.Sequential:
    """mmcv `make_res_layer` with BasicBlock: a 1×1 (strided) conv + BN shortcut on block 0 when needed."""
    downsample = None
    if stride != 1 or inplanes != planes:
        downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes))
    layers = [BasicBlock(inplanes, planes, stride, dilation, downsample)]
    layers += [BasicBlock(planes, planes, 1, dilation) for _ in range(1, blocks)]
    return nn.Sequential(*layers)


class GeneralizedResNet(nn.ModuleList):
    """Official `GeneralizedResNet`: one BasicBlock stage per `blocks` entry.

    Args:
        in_channels: input BEV channels (80 for the camera models).
        blocks: [[num_blocks, out_channels, stride], ...], e.g. [[2, 128, 2], [2, 256, 2], [2, 512, 1]].

    Forward: (B, in_channels, H, W) → list of every stage's output.
    """

    def __init__(self, in_channels: int, blocks: Sequence[Sequence[int]]):
        super().__init__()
        self.in_channels = in_channels
        self.blocks = [list(b) for b in blocks]
        for num_blocks, out_channels, stride in self.blocks:
            self.append(make_res_layer(in_channels, out_channels, num_blocks, stride=stride))
            in_channels = out_channels

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:  # type: ignore[override]
        outputs = []
        for stage in self:
            x = stage(x)
            outputs.append(x)
        return outputs


class LSSFPN(nn.Module):
    """Official `LSSFPN`: upsample x[in_indices[0]] to x[in_indices[1]]'s size, concat, fuse, upsample.

    `fuse` = 1×1 conv → BN → ReLU → 3×3 conv → BN → ReLU; with scale_factor > 1, `upsample` =
    bilinear ×scale_factor (align_corners true) → 3×3 conv → BN → ReLU. Convs have no bias.

    Args:
        in_indices: which backbone outputs to fuse, e.g. [-1, 0].
        in_channels: their channels, e.g. [512, 128].
        out_channels: output channels.
        scale_factor: final upsampling factor (1 = none).

    Forward: list of maps → (B, out_channels, H·s, W·s) (a tensor, as upstream), H, W of x[in_indices[1]].
    """

    def __init__(self, in_indices: Sequence[int], in_channels: Sequence[int], out_channels: int,
                 scale_factor: int = 1):
        super().__init__()
        self.in_indices, self.in_channels = list(in_indices), list(in_channels)
        self.out_channels, self.scale_factor = out_channels, scale_factor
        self.fuse = nn.Sequential(
            nn.Conv2d(in_channels[0] + in_channels[1], out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels), nn.ReLU(True),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels), nn.ReLU(True),
        )
        if scale_factor > 1:
            self.upsample = nn.Sequential(
                nn.Upsample(scale_factor=scale_factor, mode="bilinear", align_corners=True),
                nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
                nn.BatchNorm2d(out_channels), nn.ReLU(True),
            )

    def forward(self, x: Sequence[torch.Tensor]) -> torch.Tensor:
        x1, x2 = x[self.in_indices[0]], x[self.in_indices[1]]
        for k, (t, c) in enumerate(((x1, self.in_channels[0]), (x2, self.in_channels[1]))):
            if t.shape[1] != c:
                raise ValueError(f"LSSFPN: input {self.in_indices[k]} has {t.shape[1]} channels, expected {c}")
        x1 = F.interpolate(x1, size=x2.shape[-2:], mode="bilinear", align_corners=True)
        out = self.fuse(torch.cat([x1, x2], dim=1))
        if self.scale_factor > 1:
            out = self.upsample(out)
        return out
