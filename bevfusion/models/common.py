"""Small building blocks shared by the dense model parts, named as mmcv names them.

`ConvModule` keeps mmcv's child names (`conv`, `bn`, `activate`) so that official checkpoint keys such
as `lateral_convs.0.conv.weight` / `lateral_convs.0.bn.running_mean` load unchanged. `build_norm` and
`build_activation` read the official `norm_cfg` / `act_cfg` mappings (`{type: BN, eps: 1e-3, ...}`).
"""
from __future__ import annotations

import logging
import os
from typing import Any, Mapping

import torch
from torch import nn

__all__ = ["freeze_module", "init_from_cfg", "merge_pretrained", "read_local_checkpoint", "URL_PREFIXES", "ConvModule", "DropPath", "build_norm", "build_activation", "norm_name", "kaiming_init",
           "trunc_normal_"]

_NORMS = {"BN": nn.BatchNorm2d, "BN2d": nn.BatchNorm2d, "BN1d": nn.BatchNorm1d, "BN3d": nn.BatchNorm3d,
          "SyncBN": nn.SyncBatchNorm, "GN": nn.GroupNorm, "LN": nn.LayerNorm}
# mmcv names a norm child by the abbreviation of its class ("bn", "gn", "ln").
_NORM_ABBR = {"BN": "bn", "BN1d": "bn", "BN2d": "bn", "BN3d": "bn", "SyncBN": "bn", "GN": "gn", "LN": "ln"}
_ACTS = {"ReLU": nn.ReLU, "LeakyReLU": nn.LeakyReLU, "GELU": nn.GELU, "Sigmoid": nn.Sigmoid, "SiLU": nn.SiLU,
         "Swish": nn.SiLU, "Tanh": nn.Tanh}


def norm_name(norm_cfg: Mapping[str, Any]) -> str:
    """Child name mmcv gives a norm layer built from `norm_cfg` ("bn" for BN/BN2d/SyncBN)."""
    kind = norm_cfg.get("type", "BN")
    if kind not in _NORM_ABBR:
        raise ValueError(f"norm_cfg: unknown norm type {kind!r} (expected one of {', '.join(_NORMS)})")
    return _NORM_ABBR[kind]


def build_norm(norm_cfg: Mapping[str, Any] | None, num_features: int) -> nn.Module:
    """A norm layer from an mmcv-style `norm_cfg` (type, eps, momentum, requires_grad, num_groups)."""
    cfg = dict(norm_cfg or {"type": "BN"})
    kind = cfg.pop("type", "BN")
    requires_grad = cfg.pop("requires_grad", True)
    if kind not in _NORMS:
        raise ValueError(f"norm_cfg: unknown norm type {kind!r} (expected one of {', '.join(_NORMS)})")
    if kind == "GN":
        layer = nn.GroupNorm(num_channels=num_features, **cfg)
    elif kind == "LN":
        layer = nn.LayerNorm(num_features, **cfg)
    else:
        layer = _NORMS[kind](num_features, **cfg)
    for p in layer.parameters():
        p.requires_grad = requires_grad
    return layer


def build_activation(act_cfg: Mapping[str, Any] | None, inplace: bool | None = None) -> nn.Module | None:
    """An activation from an mmcv-style `act_cfg` ({type: ReLU, inplace: true}); None gives None."""
    if act_cfg is None:
        return None
    cfg = dict(act_cfg)
    kind = cfg.pop("type", "ReLU")
    if kind not in _ACTS:
        raise ValueError(f"act_cfg: unknown activation {kind!r} (expected one of {', '.join(_ACTS)})")
    if inplace is not None and kind in ("ReLU", "LeakyReLU", "SiLU", "Swish"):
        cfg["inplace"] = inplace
    if kind in ("GELU", "Sigmoid", "Tanh"):
        cfg.pop("inplace", None)
    return _ACTS[kind](**cfg)


def kaiming_init(module: nn.Module, a: float = 0.0, mode: str = "fan_out", nonlinearity: str = "relu",
                 bias: float = 0.0, distribution: str = "normal") -> None:
    """mmcv's `kaiming_init` defaults (normal, fan_out, relu; bias to a constant)."""
    if distribution == "uniform":
        nn.init.kaiming_uniform_(module.weight, a=a, mode=mode, nonlinearity=nonlinearity)
    else:
        nn.init.kaiming_normal_(module.weight, a=a, mode=mode, nonlinearity=nonlinearity)
    if getattr(module, "bias", None) is not None:
        nn.init.constant_(module.bias, bias)


def trunc_normal_(tensor: torch.Tensor, std: float = 0.02) -> torch.Tensor:
    """Truncated normal N(0, std) cut at ±2 (absolute, as timm/mmcv `trunc_normal_` with defaults)."""
    return nn.init.trunc_normal_(tensor, mean=0.0, std=std, a=-2.0, b=2.0)


class ConvModule(nn.Module):
    """conv → norm → activation with mmcv's child names (`conv`, `bn`, `activate`) and init.

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, groups: as nn.Conv2d.
        bias: "auto" means a bias only when there is no norm layer (mmcv's rule).
        conv_cfg: None or {type: Conv2d|Conv1d|Conv3d}.
        norm_cfg: None or an mmcv norm config ({type: BN, eps, momentum, requires_grad}).
        act_cfg: None or an mmcv activation config (default ReLU).
        inplace: in-place activation.

    The conv gets mmcv's init (kaiming normal, fan_out, relu; zero bias) and the norm weight 1, bias 0,
    which mmcv applies in the ConvModule constructor.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | tuple[int, ...], stride: int = 1,
                 padding: int = 0, dilation: int = 1, groups: int = 1, bias: bool | str = "auto",
                 conv_cfg: Mapping[str, Any] | None = None, norm_cfg: Mapping[str, Any] | None = None,
                 act_cfg: Mapping[str, Any] | None = {"type": "ReLU"}, inplace: bool = True):
        super().__init__()
        kind = (conv_cfg or {}).get("type", "Conv2d")
        convs = {"Conv2d": nn.Conv2d, "Conv": nn.Conv2d, "Conv1d": nn.Conv1d, "Conv3d": nn.Conv3d}
        if kind not in convs:
            raise ValueError(f"conv_cfg: unknown conv type {kind!r} (expected one of {', '.join(convs)})")
        if bias == "auto":
            bias = norm_cfg is None
        self.conv = convs[kind](in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                                dilation=dilation, groups=groups, bias=bool(bias))
        self.norm_name = None
        if norm_cfg is not None:
            self.norm_name = norm_name(norm_cfg)
            self.add_module(self.norm_name, build_norm(norm_cfg, out_channels))
        self.activate = build_activation(act_cfg, inplace)
        if (act_cfg or {}).get("type") == "LeakyReLU":
            kaiming_init(self.conv, a=act_cfg.get("negative_slope", 0.01), nonlinearity="leaky_relu")
        else:
            kaiming_init(self.conv)
        if self.norm_name is not None:
            norm = getattr(self, self.norm_name)
            if getattr(norm, "weight", None) is not None:
                nn.init.constant_(norm.weight, 1.0)
                nn.init.constant_(norm.bias, 0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        if self.norm_name is not None:
            x = getattr(self, self.norm_name)(x)
        if self.activate is not None:
            x = self.activate(x)
        return x


class DropPath(nn.Module):
    """Stochastic depth per sample (drops the whole residual branch, rescales the kept ones by 1/(1-p))."""

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = float(drop_prob)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        mask = x.new_empty(shape).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"



# init_cfg.checkpoint values that name a remote file: never downloaded.
URL_PREFIXES = ("http://", "https://", "s3://", "ftp://", "torchvision://", "open-mmlab://", "modelzoo://",
                "pavi://", "mmcls://")


def merge_pretrained(name: str, init_cfg: Mapping[str, Any] | None, pretrained: str | None
                     ) -> dict[str, Any] | None:
    """A backbone's init_cfg from the official pair of arguments: `pretrained=PATH` (mmdet's older
    form) means {type: Pretrained, checkpoint: PATH}; giving both is an error naming the backbone."""
    if pretrained is not None:
        if init_cfg is not None:
            raise ValueError(f"{name}: give init_cfg or pretrained, not both")
        init_cfg = {"type": "Pretrained", "checkpoint": pretrained}
    return dict(init_cfg) if init_cfg is not None else None


def init_from_cfg(module: nn.Module, init_cfg: Mapping[str, Any] | None, name: str, logger: logging.Logger,
                  warned: set[str]) -> None:
    """Backbone init from an official `init_cfg`: `module._random_init()` without one,
    `module.load_pretrained(path)` for a local `checkpoint`. A URL is never downloaded: the module keeps
    its random init and logs one warning per URL (tracked in `warned`) saying how to give a local file."""
    if init_cfg is None:
        module._random_init()
        return
    if init_cfg.get("type", "Pretrained") != "Pretrained" or "checkpoint" not in init_cfg:
        raise ValueError(f"{name}.init_cfg: expected {{type: Pretrained, checkpoint: PATH}}, got {init_cfg}")
    path = str(init_cfg["checkpoint"])
    if path.startswith(URL_PREFIXES):
        module._random_init()
        if path not in warned:
            warned.add(path)
            logger.warning(
                "%s: init_cfg.checkpoint is a URL (%s); nothing is downloaded and the camera backbone starts from "
                "random init. To use pretrained weights, download the file yourself and pass "
                "--set model.encoders.camera.backbone.init_cfg.checkpoint=PATH (a local file).", name, path)
        return
    module.load_pretrained(path)


def read_local_checkpoint(path: str | os.PathLike, what: str) -> Any:
    """`torch.load(weights_only=True)` of a local backbone checkpoint, with errors that name the file."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: {what} checkpoint not found (model.encoders.camera.backbone."
                                "init_cfg.checkpoint); give a local file or set it to null for random init")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"{path}: cannot be read safely with weights_only=True: {exc}") from None


def freeze_module(module: nn.Module) -> None:
    """Eval mode and no gradients for `module` (frozen backbone stages)."""
    module.eval()
    for p in module.parameters():
        p.requires_grad = False
