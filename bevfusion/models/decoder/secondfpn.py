"""SECONDFPN: bring each SECOND stage back to the first stage's resolution and concatenate."""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from bevfusion.models.layers import Conv2d, ConvSpec, NormSpec, as_spec, deconv

__all__ = ["SECONDFPN"]

_BN = {"type": "BN", "eps": 1e-3, "momentum": 0.01}


class SECONDFPN(nn.Module):
    """Official `SECONDFPN` (mmdet3d): `deblocks.{i}` = Sequential(up/down layer, BN, ReLU).

    The layer of input i is a ConvTranspose2d with kernel = stride = upsample_strides[i] when the
    stride is > 1 (or == 1 without `use_conv_for_no_stride`); otherwise a Conv2d with kernel = stride =
    round(1 / upsample_strides[i]) (a 1×1 conv at stride 1).

    Args:
        in_channels: channels of each input level.
        out_channels: channels after each deblock (concatenated at the end).
        upsample_strides: per level; fractions (0.5) mean a strided conv.
        norm_cfg: norm config (official default BN eps 1e-3, momentum 0.01).
        upsample_cfg: {type: deconv, bias: false} (official default).
        conv_cfg: {type: Conv2d, bias: false} (official default).
        use_conv_for_no_stride: use a conv (not a transposed conv) for stride-1 levels.
        init_cfg: accepted for config compatibility, unused (BEVFusion never runs it).

    Forward: sequence of (B, in_channels[i], H_i, W_i) → [ (B, sum(out_channels), H, W) ].
    """

    def __init__(self, in_channels: Sequence[int] = (128, 128, 256), out_channels: Sequence[int] = (256, 256, 256),
                 upsample_strides: Sequence[float] = (1, 2, 4), norm_cfg: NormSpec | Mapping[str, Any] | None = None,
                 upsample_cfg: ConvSpec | Mapping[str, Any] | None = None,
                 conv_cfg: ConvSpec | Mapping[str, Any] | None = None,
                 use_conv_for_no_stride: bool = False, init_cfg: Any = None):
        super().__init__()
        if not (len(in_channels) == len(out_channels) == len(upsample_strides)):
            raise ValueError("SECONDFPN: in_channels, out_channels and upsample_strides need the same length")
        norm = as_spec(norm_cfg, NormSpec, _BN, "norm_cfg")
        upsample = as_spec(upsample_cfg, ConvSpec, {"type": "deconv", "bias": False}, "upsample_cfg")
        conv = as_spec(conv_cfg, ConvSpec, {"type": "Conv2d", "bias": False}, "conv_cfg")
        if not isinstance(upsample, deconv):
            raise ValueError(f"SECONDFPN: upsample_cfg type {upsample.type_name!r} is not supported (deconv)")
        if not isinstance(conv, Conv2d):
            raise ValueError(f"SECONDFPN: conv_cfg type {conv.type_name!r} is not supported (Conv2d)")
        self.in_channels, self.out_channels = list(in_channels), list(out_channels)
        deblocks = []
        for cin, cout, stride in zip(in_channels, out_channels, upsample_strides):
            if stride > 1 or (stride == 1 and not use_conv_for_no_stride):
                k = int(stride)
                layer: nn.Module = upsample(cin, cout, k, stride=k)
            else:
                k = int(np.round(1 / stride))
                layer = conv(cin, cout, k, stride=k)
            deblocks.append(nn.Sequential(layer, norm(cout), nn.ReLU(inplace=True)))
        self.deblocks = nn.ModuleList(deblocks)

    def forward(self, x: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        if len(x) != len(self.deblocks):
            raise ValueError(f"SECONDFPN: expected {len(self.deblocks)} inputs, got {len(x)}")
        ups = [deblock(x[i]) for i, deblock in enumerate(self.deblocks)]
        return [torch.cat(ups, dim=1) if len(ups) > 1 else ups[0]]
