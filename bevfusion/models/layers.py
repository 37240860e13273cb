"""Layer specs: what an mmcv-style `norm_cfg`, `act_cfg`, `conv_cfg`, `upsample_cfg` or `init_cfg` section
builds to.

A config section such as `norm_cfg: {type: BN, eps: 1.0e-3, momentum: 0.01}` describes many layers (one per
stage), so the registry builds it into a spec, and the module that owns the section calls the spec once per
layer: `norm(num_features)` → a fresh `nn.BatchNorm2d`. The names are the official `type` names (the
registry maps `BN` to `bevfusion.models.layers:BN`); the keyword arguments are the torch ones plus mmcv's
`requires_grad`. Modules also accept the plain mapping (handy in Python): `as_spec` builds it through the
same registry, so there is one builder and one error type either way.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from torch import nn

__all__ = ["NormSpec", "ActivationSpec", "ConvSpec", "Pretrained", "as_spec", "BN", "BN1d", "BN2d", "BN3d", "SyncBN",
           "GN", "LN", "ReLU", "LeakyReLU", "GELU", "Sigmoid", "SiLU", "Swish", "Tanh", "Conv", "Conv1d", "Conv2d",
           "Conv3d", "deconv", "ConvTranspose2d"]


def as_spec(value: Any, kind: type, default: Mapping[str, Any] | None = None, path: str = "") -> Any:
    """`value` as a spec of class `kind`: a spec passes through, a mapping is built by the registry,
    None gives `default` built (or None without a default)."""
    from bevfusion.registry import built

    return built(value, path or kind.__name__, default, kind)


# ----------------------------------------------------------------------------------------------- norms
class NormSpec:
    """A built `norm_cfg`: `spec(num_features, dims=None)` makes one norm layer.

    `abbr` is the child name mmcv gives the layer ("bn", "gn", "ln"). Generic batch norms (`BN`, `SyncBN`)
    take their dimensionality from the caller (`dims`, default 2; the sparse encoder asks for 1); `BN1d`,
    `BN2d` and `BN3d` fix it and refuse another. `requires_grad: false` freezes the layer's affine parameters.
    """

    abbr = "bn"
    dims: int | None = None  # fixed dimensionality, None: the caller's

    def __init__(self, requires_grad: bool = True, **kwargs: Any):
        self.requires_grad = bool(requires_grad)
        self.kwargs = kwargs

    @property
    def type_name(self) -> str:
        return type(self).__name__

    def layer_class(self, dims: int) -> type[nn.Module]:
        return {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[dims]

    def __call__(self, num_features: int, dims: int | None = None) -> nn.Module:
        if self.dims is not None and dims is not None and dims != self.dims:
            raise ValueError(f"norm_cfg: type {self.type_name} is a {self.dims}-d norm; this layer needs {dims}-d "
                             f"(use BN or BN{dims}d)")
        layer = self.make(num_features, self.dims or dims or 2)
        for p in layer.parameters():
            p.requires_grad = self.requires_grad
        return layer

    def make(self, num_features: int, dims: int) -> nn.Module:
        return self.layer_class(dims)(num_features, **self.kwargs)

    def __repr__(self) -> str:
        return f"{self.type_name}({self.kwargs}, requires_grad={self.requires_grad})"


class _BatchNorm(NormSpec):
    def __init__(self, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, requires_grad: bool = True):
        super().__init__(requires_grad, eps=eps, momentum=momentum, affine=affine,
                         track_running_stats=track_running_stats)


class BN(_BatchNorm):
    """Batch norm, 2-d unless the layer asks for another (official `BN`)."""


class BN1d(_BatchNorm):
    dims = 1


class BN2d(_BatchNorm):
    dims = 2


class BN3d(_BatchNorm):
    dims = 3


class SyncBN(_BatchNorm):
    """Synchronised batch norm for 2-d layers (`nn.SyncBatchNorm`); 1-d layers (sparse features) get BatchNorm1d."""

    def layer_class(self, dims: int) -> type[nn.Module]:
        return nn.SyncBatchNorm if dims != 1 else nn.BatchNorm1d


class GN(NormSpec):
    abbr = "gn"

    def __init__(self, num_groups: int, eps: float = 1e-5, affine: bool = True, requires_grad: bool = True):
        super().__init__(requires_grad, num_groups=num_groups, eps=eps, affine=affine)

    def make(self, num_features: int, dims: int) -> nn.Module:
        return nn.GroupNorm(num_channels=num_features, **self.kwargs)


class LN(NormSpec):
    abbr = "ln"

    def __init__(self, eps: float = 1e-5, elementwise_affine: bool = True, requires_grad: bool = True):
        super().__init__(requires_grad, eps=eps, elementwise_affine=elementwise_affine)

    def make(self, num_features: int, dims: int) -> nn.Module:
        return nn.LayerNorm(num_features, **self.kwargs)


# ----------------------------------------------------------------------------------------------- activations
class ActivationSpec:
    """A built `act_cfg`: `spec(inplace=None)` makes one activation (the caller's `inplace` wins if given,
    for the activations that have the option)."""

    layer: type[nn.Module] = nn.ReLU
    has_inplace = True

    def __init__(self, inplace: bool = False, **kwargs: Any):
        self.inplace, self.kwargs = inplace, kwargs

    @property
    def type_name(self) -> str:
        return type(self).__name__

    def __call__(self, inplace: bool | None = None) -> nn.Module:
        kwargs = dict(self.kwargs)
        if self.has_inplace:
            kwargs["inplace"] = self.inplace if inplace is None else inplace
        return self.layer(**kwargs)


class ReLU(ActivationSpec):
    layer = nn.ReLU


class LeakyReLU(ActivationSpec):
    layer = nn.LeakyReLU

    def __init__(self, negative_slope: float = 0.01, inplace: bool = False):
        super().__init__(inplace, negative_slope=negative_slope)


class SiLU(ActivationSpec):
    layer = nn.SiLU


class Swish(SiLU):
    """mmcv's name for SiLU."""


class GELU(ActivationSpec):
    layer, has_inplace = nn.GELU, False

    def __init__(self, approximate: str = "none", inplace: bool = False):  # inplace accepted, as mmcv's GELU
        super().__init__(inplace, approximate=approximate)


class Sigmoid(ActivationSpec):
    layer, has_inplace = nn.Sigmoid, False


class Tanh(ActivationSpec):
    layer, has_inplace = nn.Tanh, False


# ----------------------------------------------------------------------------------------------- convolutions
class ConvSpec:
    """A built `conv_cfg` / `upsample_cfg`: `spec(in, out, kernel, ..., bias=default)` makes one layer.
    A `bias` in the config wins over the caller's default (mmcv passes the config's keys through)."""

    layer: type[nn.Module] = nn.Conv2d

    def __init__(self, bias: bool | None = None):
        self.bias = bias

    @property
    def type_name(self) -> str:
        return type(self).__name__

    def __call__(self, *args: Any, bias: bool = True, **kwargs: Any) -> nn.Module:
        return self.layer(*args, bias=bool(bias if self.bias is None else self.bias), **kwargs)


class Conv2d(ConvSpec):
    layer = nn.Conv2d


class Conv(Conv2d):
    """mmcv's alias of Conv2d."""


class Conv1d(ConvSpec):
    layer = nn.Conv1d


class Conv3d(ConvSpec):
    layer = nn.Conv3d


class deconv(ConvSpec):  # noqa: N801  (the official type name)
    """A transposed 2-d conv (mmcv's `deconv` upsample layer)."""

    layer = nn.ConvTranspose2d


class ConvTranspose2d(deconv):
    pass


# ----------------------------------------------------------------------------------------------- init
@dataclass(frozen=True)
class Pretrained:
    """A built `init_cfg: {type: Pretrained, checkpoint: PATH}`: load a local checkpoint into a backbone
    (a URL is never downloaded; see `bevfusion.models.common.init_from_cfg`)."""

    checkpoint: str
    prefix: str | None = None

    def __post_init__(self):
        if not isinstance(self.checkpoint, str) or not self.checkpoint:
            raise ValueError(f"init_cfg.checkpoint must be a path, got {self.checkpoint!r}")
