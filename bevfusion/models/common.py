"""Small building blocks shared by the dense model parts, named as mmcv names them.

`ConvModule` keeps mmcv's child names (`conv`, `bn`, `activate`) so that official checkpoint keys such
as `lateral_convs.0.conv.weight` / `lateral_convs.0.bn.running_mean` load unchanged. `build_norm` and
`build_activation` make one layer from a layer spec (`bevfusion.models.layers`) or the official
`norm_cfg` / `act_cfg` mapping it is built from (`{type: BN, eps: 1e-3, ...}`).
"""
from __future__ import annotations

import logging
import os
from collections import OrderedDict
from typing import Any, Mapping

import torch
from torch import nn

from bevfusion.models.layers import ActivationSpec, ConvSpec, LeakyReLU, NormSpec, Pretrained, as_spec

__all__ = ["backbone_state_dict", "freeze_module", "init_from_cfg", "merge_pretrained", "read_local_checkpoint", "URL_PREFIXES", "ConvModule", "DropPath", "build_norm", "build_activation", "norm_name", "kaiming_init",
           "trunc_normal_"]

def norm_name(norm_cfg: NormSpec | Mapping[str, Any] | None) -> str:
    """Child name mmcv gives a norm layer built from `norm_cfg` ("bn" for BN/BN2d/SyncBN)."""
    return as_spec(norm_cfg, NormSpec, {"type": "BN"}, "norm_cfg").abbr


def build_norm(norm_cfg: NormSpec | Mapping[str, Any] | None, num_features: int, dims: int | None = None) -> nn.Module:
    """One norm layer from a norm spec or an mmcv-style `norm_cfg` mapping (default BN)."""
    return as_spec(norm_cfg, NormSpec, {"type": "BN"}, "norm_cfg")(num_features, dims)


def build_activation(act_cfg: ActivationSpec | Mapping[str, Any] | None, inplace: bool | None = None
                     ) -> nn.Module | None:
    """One activation from a spec or an mmcv-style `act_cfg` ({type: ReLU, inplace: true}); None gives None."""
    spec = as_spec(act_cfg, ActivationSpec, None, "act_cfg")
    return spec(inplace) if spec is not None else None


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
        conv_cfg: a conv spec or its config (default {type: Conv2d}).
        norm_cfg: None, a norm spec or an mmcv norm config ({type: BN, eps, momentum, requires_grad}).
        act_cfg: None, an activation spec or an mmcv activation config (default ReLU).
        inplace: in-place activation.

    The conv gets mmcv's init (kaiming normal, fan_out, relu; zero bias) and the norm weight 1, bias 0,
    which mmcv applies in the ConvModule constructor.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | tuple[int, ...], stride: int = 1,
                 padding: int = 0, dilation: int = 1, groups: int = 1, bias: bool | str = "auto",
                 conv_cfg: Mapping[str, Any] | None = None, norm_cfg: Mapping[str, Any] | None = None,
                 act_cfg: Mapping[str, Any] | None = {"type": "ReLU"}, inplace: bool = True):
        super().__init__()
        conv = as_spec(conv_cfg, ConvSpec, {"type": "Conv2d"}, "conv_cfg")
        norm = as_spec(norm_cfg, NormSpec, None, "norm_cfg")
        act = as_spec(act_cfg, ActivationSpec, None, "act_cfg")
        if bias == "auto":
            bias = norm is None
        self.conv = conv(in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                         dilation=dilation, groups=groups, bias=bool(bias))
        self.norm_name = None
        if norm is not None:
            self.norm_name = norm.abbr
            self.add_module(self.norm_name, norm(out_channels))
        self.activate = act(inplace) if act is not None else None
        if isinstance(act, LeakyReLU):
            kaiming_init(self.conv, a=act.kwargs["negative_slope"], nonlinearity="leaky_relu")
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


def merge_pretrained(name: str, init_cfg: Pretrained | Mapping[str, Any] | None, pretrained: str | None
                     ) -> Pretrained | None:
    """A backbone's init from the official pair of arguments: `pretrained=PATH` (mmdet's older form) means
    {type: Pretrained, checkpoint: PATH}; giving both is an error naming the backbone."""
    if pretrained is not None:
        if init_cfg is not None:
            raise ValueError(f"{name}: give init_cfg or pretrained, not both")
        return Pretrained(pretrained)
    return as_spec(init_cfg, Pretrained, None, f"{name}.init_cfg")


def init_from_cfg(module: nn.Module, init_cfg: Pretrained | None, name: str, logger: logging.Logger,
                  warned: set[str]) -> None:
    """Backbone init: `module._random_init()` without a `Pretrained`, `module.load_pretrained(path)` for a
    local `checkpoint`. A URL is never downloaded: the module keeps its random init and logs one warning
    per URL (tracked in `warned`) saying how to give a local file."""
    if init_cfg is None:
        module._random_init()
        return
    path = init_cfg.checkpoint
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


def backbone_state_dict(ckpt: Any) -> "OrderedDict[str, torch.Tensor]":
    """The camera-backbone tensors of a checkpoint, keyed as in the backbone itself.

    Accepts `{state_dict: ...}` (mmcv), `{model: ...}` (torchvision / Swin repo) or a plain state dict; strips a
    DDP `module.` prefix, and keeps only the `encoders.camera.backbone.` (BEVFusion) or `backbone.` (mmdet
    detector) part when there is one.
    """
    if not isinstance(ckpt, Mapping):
        return OrderedDict()
    state = ckpt["state_dict"] if "state_dict" in ckpt else ckpt["model"] if "model" in ckpt else ckpt
    state = OrderedDict((k[len("module."):] if k.startswith("module.") else k, v) for k, v in state.items()
                        if isinstance(v, torch.Tensor))
    for prefix in ("encoders.camera.backbone.", "backbone."):
        if any(k.startswith(prefix) for k in state):
            return OrderedDict((k[len(prefix):], v) for k, v in state.items() if k.startswith(prefix))
    return state


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
