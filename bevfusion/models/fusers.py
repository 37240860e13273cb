"""Fusers: combine the camera and LiDAR BEV maps (official `ConvFuser`)."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

__all__ = ["ConvFuser"]


class ConvFuser(nn.Sequential):
    """Concatenate the BEV maps on channels, then 3×3 conv (no bias) → BN → ReLU.

    An `nn.Sequential` as upstream, so the checkpoint keys are `fuser.0.weight` and `fuser.1.*`.

    Args:
        in_channels: channels of each input, in input order (camera, LiDAR), e.g. [80, 256].
        out_channels: output channels.

    Forward: a sequence of (B, C_i, X, Y) maps with the same X, Y → (B, out_channels, X, Y).
    """

    def __init__(self, in_channels: Sequence[int], out_channels: int):
        self.in_channels = list(in_channels)
        self.out_channels = out_channels
        super().__init__(
            nn.Conv2d(sum(self.in_channels), out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),  # torch defaults: eps 1e-5, momentum 0.1, as upstream
            nn.ReLU(True),
        )

    def forward(self, inputs: Sequence[torch.Tensor]) -> torch.Tensor:  # type: ignore[override]
        if len(inputs) != len(self.in_channels):
            raise ValueError(f"ConvFuser: expected {len(self.in_channels)} inputs, got {len(inputs)}")
        for k, (x, c) in enumerate(zip(inputs, self.in_channels)):
            if x.shape[1] != c:
                raise ValueError(f"ConvFuser: input {k} has {x.shape[1]} channels, expected {c}")
        return super().forward(torch.cat(list(inputs), dim=1))
