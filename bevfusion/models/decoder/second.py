"""SECOND BEV backbone: stages of 3×3 conv-BN-ReLU, the first conv of each stage strided."""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch import nn

from bevfusion.models.layers import Conv2d, ConvSpec, NormSpec, as_spec

__all__ = ["SECOND"]

_BN = {"type": "BN", "eps": 1e-3, "momentum": 0.01}


class SECOND(nn.Module):
    """Official `SECOND` (mmdet3d): `blocks.{i}` = Sequential(conv, BN, ReLU, ×(layer_nums[i] + 1)).

    Args:
        in_channels: input BEV channels.
        out_channels: channels per stage.
        layer_nums: extra stride-1 convs per stage (the first, strided conv comes on top).
        layer_strides: stride of each stage's first conv.
        norm_cfg: norm config (official default BN eps 1e-3, momentum 0.01).
        conv_cfg: {type: Conv2d, bias: false} (official default).
        init_cfg, pretrained: accepted for config compatibility; unused (upstream's Kaiming init_cfg
            never runs because BEVFusion overrides init_weights; layers keep torch's default init).

    Forward: (B, in_channels, X, Y) → tuple of (B, out_channels[i], X / prod(strides[:i+1]), ...).
    """

    def __init__(self, in_channels: int = 128, out_channels: Sequence[int] = (128, 128, 256),
                 layer_nums: Sequence[int] = (3, 5, 5), layer_strides: Sequence[int] = (2, 2, 2),
                 norm_cfg: NormSpec | Mapping[str, Any] | None = None,
                 conv_cfg: ConvSpec | Mapping[str, Any] | None = None, init_cfg: Any = None, pretrained: Any = None):
        super().__init__()
        if not (len(out_channels) == len(layer_nums) == len(layer_strides)):
            raise ValueError("SECOND: out_channels, layer_nums and layer_strides need the same length")
        norm = as_spec(norm_cfg, NormSpec, _BN, "norm_cfg")
        conv = as_spec(conv_cfg, ConvSpec, {"type": "Conv2d", "bias": False}, "conv_cfg")
        if not isinstance(conv, Conv2d):
            raise ValueError(f"SECOND: conv_cfg type {conv.type_name!r} is not supported (Conv2d)")
        # mmcv's build_conv_layer passes the config's bias through; without one, Conv2d has a bias
        in_filters = [in_channels, *out_channels[:-1]]
        blocks = []
        for cin, cout, n, stride in zip(in_filters, out_channels, layer_nums, layer_strides):
            layers: list[nn.Module] = [conv(cin, cout, 3, stride=stride, padding=1), norm(cout), nn.ReLU(inplace=True)]
            for _ in range(n):
                layers += [conv(cout, cout, 3, padding=1), norm(cout), nn.ReLU(inplace=True)]
            blocks.append(nn.Sequential(*layers))
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outs = []
        for block in self.blocks:
            x = block(x)
            outs.append(x)
        return tuple(outs)
