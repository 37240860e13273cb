"""Camera neck: official `GeneralizedLSSFPN` (mmdet3d `necks/generalized_lss.py`).

Top-down FPN where each level concatenates its backbone feature with the upsampled coarser level (the
raw backbone feature for the coarsest pair) and fuses them with a 1×1 ConvModule (`lateral_convs.i`)
and a 3×3 ConvModule (`fpn_convs.i`). With Swin-T inputs [192, 384, 768] it returns two maps
(despite num_outs 3): [B, 256, H/8, W/8] (used by the view transform) and [B, 256, H/16, W/16].
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from bevfusion.models.common import ConvModule

__all__ = ["GeneralizedLSSFPN"]


class GeneralizedLSSFPN(nn.Module):
    """Official `GeneralizedLSSFPN`.

    Args:
        in_channels: backbone channels per level, fine to coarse (e.g. [192, 384, 768]).
        out_channels: channels of every output.
        num_outs: kept for config compatibility (the number of outputs is end level − start level).
        start_level, end_level: backbone levels used (end_level −1: up to the last).
        no_norm_on_lateral: lateral 1×1 convs without norm (then with bias).
        conv_cfg, norm_cfg, act_cfg: mmcv-style configs (official: BN2d, ReLU).
        upsample_cfg: F.interpolate arguments (official configs: bilinear, align_corners false).

    Forward: sequence of (B, in_channels[i], H_i, W_i) → tuple of (B, out_channels, H_i, W_i) for the
    used levels except the coarsest.
    """

    def __init__(self, in_channels: Sequence[int], out_channels: int, num_outs: int, start_level: int = 0,
                 end_level: int = -1, no_norm_on_lateral: bool = False, conv_cfg: Mapping[str, Any] | None = None,
                 norm_cfg: Mapping[str, Any] | None = {"type": "BN2d"},
                 act_cfg: Mapping[str, Any] | None = {"type": "ReLU"},
                 upsample_cfg: Mapping[str, Any] | None = {"mode": "bilinear", "align_corners": True},
                 init_cfg: Any = None):
        super().__init__()
        self.in_channels, self.out_channels = list(in_channels), out_channels
        self.num_ins, self.num_outs = len(in_channels), num_outs
        self.upsample_cfg = dict(upsample_cfg or {})
        if end_level == -1:
            self.backbone_end_level = self.num_ins - 1
        else:
            if end_level > self.num_ins or num_outs != end_level - start_level:
                raise ValueError("GeneralizedLSSFPN: need end_level <= len(in_channels) and "
                                 "num_outs == end_level - start_level")
            self.backbone_end_level = end_level
        self.start_level, self.end_level = start_level, end_level
        self.lateral_convs = nn.ModuleList()
        self.fpn_convs = nn.ModuleList()
        for i in range(start_level, self.backbone_end_level):
            coarser = in_channels[i + 1] if i == self.backbone_end_level - 1 else out_channels
            self.lateral_convs.append(ConvModule(
                in_channels[i] + coarser, out_channels, 1, conv_cfg=conv_cfg,
                norm_cfg=None if no_norm_on_lateral else norm_cfg, act_cfg=act_cfg, inplace=False))
            self.fpn_convs.append(ConvModule(out_channels, out_channels, 3, padding=1, conv_cfg=conv_cfg,
                                             norm_cfg=norm_cfg, act_cfg=act_cfg, inplace=False))

    def forward(self, inputs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        if len(inputs) != len(self.in_channels):
            raise ValueError(f"GeneralizedLSSFPN: expected {len(self.in_channels)} inputs, got {len(inputs)}")
        laterals = list(inputs[self.start_level:self.backbone_end_level + 1])
        used = len(laterals) - 1
        for i in range(used - 1, -1, -1):
            up = F.interpolate(laterals[i + 1], size=laterals[i].shape[2:], **self.upsample_cfg)
            x = torch.cat([laterals[i], up], dim=1)
            laterals[i] = self.fpn_convs[i](self.lateral_convs[i](x))
        return tuple(laterals[:used])
