"""ResNet camera backbone with mmdet 2.20 names (`conv1`, `bn1`, `layer{1..4}.{j}.conv{1,2,3}/bn{1,2,3}`,
`downsample.{0,1}`), the same names torchvision uses, so torchvision / mmdet ResNet files load.

Pretrained weights come from a LOCAL file only (`init_cfg: {type: Pretrained, checkpoint: PATH}`, or
`pretrained: PATH`); a URL (`torchvision://`, `https://`, ...) is never downloaded: one warning, and
mmdet's random init (Kaiming fan_out for convs, BN 1 / 0, zero last BN per block).
"""
from __future__ import annotations

import logging
import os
from collections import OrderedDict
from typing import Any, Mapping, Sequence

import torch
import torch.utils.checkpoint as cp
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from bevfusion.models.common import (backbone_state_dict, build_norm, freeze_module, init_from_cfg, kaiming_init,
                                     merge_pretrained, read_local_checkpoint)
from bevfusion.models.layers import Conv2d, ConvSpec, NormSpec, as_spec

__all__ = ["ResNet", "BasicBlock", "Bottleneck"]

logger = logging.getLogger("bevfusion.models.resnet")
_warned_urls: set[str] = set()
_BN = {"type": "BN", "requires_grad": True}


def _conv(cin: int, cout: int, k: int, stride: int = 1, padding: int = 0, dilation: int = 1,
          conv_cfg: Mapping[str, Any] | None = None) -> nn.Conv2d:
    conv = as_spec(conv_cfg, ConvSpec, {"type": "Conv2d"}, "conv_cfg")
    if not isinstance(conv, Conv2d):
        raise ValueError(f"ResNet: conv_cfg type {conv.type_name!r} is not supported (Conv2d)")
    return conv(cin, cout, k, stride=stride, padding=padding, dilation=dilation, bias=False)


class BasicBlock(nn.Module):
    """mmdet BasicBlock: 3×3 (stride) → BN → ReLU → 3×3 → BN, + shortcut, ReLU."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, dilation: int = 1,
                 downsample: nn.Module | None = None, style: str = "pytorch", with_cp: bool = False,
                 conv_cfg=None, norm_cfg=_BN):
        super().__init__()
        self.conv1 = _conv(inplanes, planes, 3, stride, dilation, dilation, conv_cfg)
        self.bn1 = build_norm(norm_cfg, planes)
        self.conv2 = _conv(planes, planes, 3, 1, 1, 1, conv_cfg)
        self.bn2 = build_norm(norm_cfg, planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample, self.with_cp = downsample, with_cp

    def _inner(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.bn2(self.conv2(out)) + identity

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = cp.checkpoint(self._inner, x, use_reentrant=False) if self.with_cp and x.requires_grad \
            else self._inner(x)
        return self.relu(out)


class Bottleneck(nn.Module):
    """mmdet Bottleneck: 1×1 → 3×3 → 1×1 (×4 channels); 'pytorch' style strides the 3×3, 'caffe' the first 1×1."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, dilation: int = 1,
                 downsample: nn.Module | None = None, style: str = "pytorch", with_cp: bool = False,
                 conv_cfg=None, norm_cfg=_BN):
        super().__init__()
        if style not in ("pytorch", "caffe"):
            raise ValueError(f"ResNet: style must be pytorch or caffe, got {style!r}")
        s1, s2 = (1, stride) if style == "pytorch" else (stride, 1)
        self.conv1 = _conv(inplanes, planes, 1, s1, 0, 1, conv_cfg)
        self.bn1 = build_norm(norm_cfg, planes)
        self.conv2 = _conv(planes, planes, 3, s2, dilation, dilation, conv_cfg)
        self.bn2 = build_norm(norm_cfg, planes)
        self.conv3 = _conv(planes, planes * self.expansion, 1, 1, 0, 1, conv_cfg)
        self.bn3 = build_norm(norm_cfg, planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample, self.with_cp = downsample, with_cp

    def _inner(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.bn3(self.conv3(out)) + identity

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = cp.checkpoint(self._inner, x, use_reentrant=False) if self.with_cp and x.requires_grad \
            else self._inner(x)
        return self.relu(out)


class ResNet(nn.Module):
    """mmdet 2.20 `ResNet` (depth 18/34/50/101/152).

    Args (official config keys): depth, in_channels, stem_channels, base_channels, num_stages, strides,
        dilations, out_indices, style ('pytorch' | 'caffe'), deep_stem, avg_down, frozen_stages (−1: none;
        k freezes the stem and layer1..k), conv_cfg, norm_cfg (BN; `requires_grad`), norm_eval (keep BN in
        eval mode while training), with_cp, zero_init_residual, pretrained, init_cfg. dcn / plugins are
        accepted only when empty.

    Forward: (B, 3, H, W) → list of layer{i+1} outputs for i in out_indices; ResNet-50 channels
    256, 512, 1024, 2048 at strides 4, 8, 16, 32.
    """

    arch_settings = {18: (BasicBlock, (2, 2, 2, 2)), 34: (BasicBlock, (3, 4, 6, 3)), 50: (Bottleneck, (3, 4, 6, 3)),
                     101: (Bottleneck, (3, 4, 23, 3)), 152: (Bottleneck, (3, 8, 36, 3))}

    def __init__(self, depth: int, in_channels: int = 3, stem_channels: int | None = None, base_channels: int = 64,
                 num_stages: int = 4, strides: Sequence[int] = (1, 2, 2, 2), dilations: Sequence[int] = (1, 1, 1, 1),
                 out_indices: Sequence[int] = (0, 1, 2, 3), style: str = "pytorch", deep_stem: bool = False,
                 avg_down: bool = False, frozen_stages: int = -1, conv_cfg: Mapping[str, Any] | None = None,
                 norm_cfg: Mapping[str, Any] | None = _BN, norm_eval: bool = True, dcn: Any = None,
                 stage_with_dcn: Sequence[bool] = (False, False, False, False), plugins: Any = None,
                 with_cp: bool = False, zero_init_residual: bool = True, pretrained: str | None = None,
                 init_cfg: Mapping[str, Any] | None = None):
        super().__init__()
        if depth not in self.arch_settings:
            raise ValueError(f"ResNet: invalid depth {depth} (expected one of {sorted(self.arch_settings)})")
        if dcn is not None or plugins:
            raise NotImplementedError("ResNet: dcn and plugins are not supported (no official BEVFusion config "
                                      "uses them)")
        if not 1 <= num_stages <= 4 or max(out_indices) >= num_stages:
            raise ValueError("ResNet: need 1 <= num_stages <= 4 and out_indices < num_stages")
        self.init_cfg = merge_pretrained("ResNet", init_cfg, pretrained)
        self.depth, self.out_indices, self.frozen_stages = depth, tuple(out_indices), frozen_stages
        self.norm_eval, self.zero_init_residual, self.deep_stem = norm_eval, zero_init_residual, deep_stem
        norm_cfg = as_spec(norm_cfg, NormSpec, _BN, "norm_cfg")
        self.block, stage_blocks = self.arch_settings[depth]
        stem_channels = stem_channels or base_channels
        if deep_stem:
            half = stem_channels // 2
            self.stem = nn.Sequential(
                _conv(in_channels, half, 3, 2, 1, conv_cfg=conv_cfg), build_norm(norm_cfg, half), nn.ReLU(True),
                _conv(half, half, 3, 1, 1, conv_cfg=conv_cfg), build_norm(norm_cfg, half), nn.ReLU(True),
                _conv(half, stem_channels, 3, 1, 1, conv_cfg=conv_cfg), build_norm(norm_cfg, stem_channels),
                nn.ReLU(True))
        else:
            self.conv1 = _conv(in_channels, stem_channels, 7, 2, 3, conv_cfg=conv_cfg)
            self.bn1 = build_norm(norm_cfg, stem_channels)
            self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.res_layers: list[str] = []
        inplanes = stem_channels
        for i, num_blocks in enumerate(stage_blocks[:num_stages]):
            planes = base_channels * 2 ** i
            layer = self._make_layer(inplanes, planes, num_blocks, strides[i], dilations[i], style, avg_down,
                                     with_cp, conv_cfg, norm_cfg)
            inplanes = planes * self.block.expansion
            self.add_module(f"layer{i + 1}", layer)
            self.res_layers.append(f"layer{i + 1}")
        self.feat_dim = inplanes
        self._freeze_stages()

    def _make_layer(self, inplanes, planes, num_blocks, stride, dilation, style, avg_down, with_cp, conv_cfg,
                    norm_cfg) -> nn.Sequential:
        """mmdet ResLayer: a shortcut conv on block 0 when the shape changes (after an AvgPool with avg_down)."""
        block, out = self.block, planes * self.block.expansion
        downsample = None
        if stride != 1 or inplanes != out:
            layers: list[nn.Module] = []
            conv_stride = stride
            if avg_down and stride != 1:
                conv_stride = 1
                layers.append(nn.AvgPool2d(stride, stride, ceil_mode=True, count_include_pad=False))
            layers += [_conv(inplanes, out, 1, conv_stride, conv_cfg=conv_cfg), build_norm(norm_cfg, out)]
            downsample = nn.Sequential(*layers)
        blocks = [block(inplanes, planes, stride, dilation, downsample, style, with_cp, conv_cfg, norm_cfg)]
        blocks += [block(out, planes, 1, dilation, None, style, with_cp, conv_cfg, norm_cfg)
                   for _ in range(1, num_blocks)]
        return nn.Sequential(*blocks)

    # ------------------------------------------------------------------ freezing / init
    def _freeze_stages(self) -> None:
        if self.frozen_stages >= 0:
            if self.deep_stem:
                freeze_module(self.stem)
            else:
                freeze_module(self.conv1)
                freeze_module(self.bn1)
        for i in range(1, self.frozen_stages + 1):
            freeze_module(getattr(self, f"layer{i}"))

    def train(self, mode: bool = True) -> "ResNet":
        super().train(mode)
        self._freeze_stages()
        if mode and self.norm_eval:
            for m in self.modules():
                if isinstance(m, _BatchNorm):
                    m.eval()
        return self

    def _random_init(self) -> None:
        """mmdet's default init_cfg: Kaiming (fan_out, normal) convs, BN 1 / 0, zero last BN per block."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                kaiming_init(m)
            elif isinstance(m, (_BatchNorm, nn.GroupNorm)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if self.zero_init_residual:
            for m in self.modules():
                if isinstance(m, Bottleneck):
                    nn.init.zeros_(m.bn3.weight)
                elif isinstance(m, BasicBlock):
                    nn.init.zeros_(m.bn2.weight)

    def init_weights(self) -> None:
        """Random init, or load `init_cfg.checkpoint` from a local file (never downloads)."""
        init_from_cfg(self, self.init_cfg, "ResNet", logger, _warned_urls)

    def load_pretrained(self, path: str | os.PathLike) -> tuple[list[str], list[str]]:
        """Load torchvision, mmdet (`backbone.`) or BEVFusion (`encoders.camera.backbone.`) ResNet weights."""
        path = os.fspath(path)
        state = backbone_state_dict(read_local_checkpoint(path, "ResNet"))
        state = OrderedDict((k, v) for k, v in state.items() if not k.startswith("fc."))  # classifier
        own = self.state_dict()
        if not any(k in own for k in state):
            raise ValueError(f"{path}: no ResNet weights found (first keys: {', '.join(list(state)[:5])})")
        missing, unexpected = self.load_state_dict(state, strict=False)
        logger.info("ResNet: loaded %s; missing %d keys, unexpected %d keys", path, len(missing), len(unexpected))
        return list(missing), list(unexpected)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(x) if self.deep_stem else self.relu(self.bn1(self.conv1(x)))
        x = self.maxpool(x)
        outs = []
        for i, name in enumerate(self.res_layers):
            x = getattr(self, name)(x)
            if i in self.out_indices:
                outs.append(x)
        return outs
