"""nn modules over SparseTensor, with the official (spconv-era) argument lists and key names."""
from __future__ import annotations

import math

import torch
from torch import nn

from .conv import check_names, sparse_conv3d, sparse_inverse_conv3d, subm_conv3d
from .tensor import SparseTensor, _triple


class _SparseConvBase(nn.Module):
    """Common parameters: weight (kx*ky*kz, Cin, Cout), optional bias (Cout). `impl` (backend) and `dataflow`
    as in `bevfusion.ops.sparse.conv`; unknown names raise ValueError here, at construction."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 bias: bool = False, impl: str = "auto", indice_key: str | None = None,
                 dataflow: str = "auto") -> None:
        super().__init__()
        check_names(impl, dataflow)
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = _triple(kernel_size, "kernel_size")
        self.stride = _triple(stride, "stride")
        self.padding = _triple(padding, "padding")
        self.dilation = _triple(dilation, "dilation")
        self.impl = impl
        self.dataflow = dataflow
        self.indice_key = indice_key  # accepted for spconv-style configs; maps are cached by geometry instead
        K = self.kernel_size[0] * self.kernel_size[1] * self.kernel_size[2]
        self.weight = nn.Parameter(torch.empty(K, in_channels, out_channels))
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        fan_in = self.weight.shape[0] * self.in_channels
        bound = 1.0 / math.sqrt(fan_in)
        # kaiming-uniform with a = sqrt(5) reduces to U(-1/sqrt(fan_in), 1/sqrt(fan_in)), as torch's ConvNd
        nn.init.uniform_(self.weight, -bound, bound)
        if self.bias is not None:
            nn.init.uniform_(self.bias, -bound, bound)

    def extra_repr(self) -> str:
        s = (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
             f"padding={self.padding}, dilation={self.dilation}, bias={self.bias is not None}")
        s += f", impl={self.impl!r}" if self.impl != "auto" else ""
        return s + (f", dataflow={self.dataflow!r}" if self.dataflow != "auto" else "")


class SubMConv3d(_SparseConvBase):
    """Submanifold conv: outputs exactly at the input sites; the kernel is always centred
    (input = output + (i - (k-1)/2)*dilation), whatever `padding` and `stride` say, as in spconv."""

    def forward(self, x: SparseTensor) -> SparseTensor:
        return subm_conv3d(x, self.weight, self.kernel_size, self.dilation, self.bias, self.impl, self.dataflow)


class SparseConv3d(_SparseConvBase):
    """Strided/padded sparse conv: output o is active wherever the window o*stride - padding + k*dilation
    covers an active input (spconv's rule, which the official checkpoints were trained with)."""

    def forward(self, x: SparseTensor) -> SparseTensor:
        return sparse_conv3d(x, self.weight, self.kernel_size, self.stride, self.padding, self.dilation, self.bias,
                             self.impl, self.dataflow)


class SparseInverseConv3d(_SparseConvBase):
    """Restores the input sites of the SparseConv3d with the same kernel_size/stride/padding/dilation
    that produced its input (transposed conv restricted to those sites)."""

    def forward(self, x: SparseTensor) -> SparseTensor:
        return sparse_inverse_conv3d(x, self.weight, self.kernel_size, self.stride, self.padding, self.dilation,
                                     self.bias, self.impl, self.dataflow)


class FeatureModule(nn.Module):
    """Applies a plain module (BatchNorm1d, ReLU, Dropout, ...) to a SparseTensor's feats."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, x: SparseTensor) -> SparseTensor:
        return x.replace_feature(self.module(x.feats))


class BatchNorm(nn.BatchNorm1d):
    """BatchNorm1d over a SparseTensor's feats (same state_dict keys as nn.BatchNorm1d)."""

    def forward(self, x):  # type: ignore[override]
        if isinstance(x, SparseTensor):
            return x.replace_feature(super().forward(x.feats))
        return super().forward(x)


class ReLU(nn.ReLU):
    """ReLU over a SparseTensor's feats (or a plain tensor)."""

    def forward(self, x):  # type: ignore[override]
        if isinstance(x, SparseTensor):
            return x.replace_feature(super().forward(x.feats))
        return super().forward(x)


class SparseSequential(nn.Sequential):
    """nn.Sequential that feeds SparseTensors through sparse modules and applies plain modules
    (nn.BatchNorm1d, nn.ReLU, ...) to the feats, like spconv's SparseSequential (same key names)."""

    def forward(self, x):  # type: ignore[override]
        for m in self:
            if isinstance(x, SparseTensor) and not _takes_sparse(m):
                x = x.replace_feature(m(x.feats))
            else:
                x = m(x)
        return x


def _takes_sparse(m: nn.Module) -> bool:
    return isinstance(m, (_SparseConvBase, FeatureModule, BatchNorm, ReLU, SparseSequential, SparseBasicBlock))


class SparseBasicBlock(nn.Module):
    """mmdet-style residual block on sparse feats: conv1 (SubM) -> bn1 -> ReLU -> conv2 (SubM) -> bn2,
    + identity, ReLU. Key names conv1/bn1/conv2/bn2 as in the official SparseEncoder."""

    def __init__(self, channels: int, kernel_size=3, norm_eps: float = 1e-3, norm_momentum: float = 0.01,
                 impl: str = "auto", dataflow: str = "auto") -> None:
        super().__init__()
        self.conv1 = SubMConv3d(channels, channels, kernel_size, padding=1, bias=False, impl=impl, dataflow=dataflow)
        self.bn1 = nn.BatchNorm1d(channels, eps=norm_eps, momentum=norm_momentum)
        self.conv2 = SubMConv3d(channels, channels, kernel_size, padding=1, bias=False, impl=impl, dataflow=dataflow)
        self.bn2 = nn.BatchNorm1d(channels, eps=norm_eps, momentum=norm_momentum)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: SparseTensor) -> SparseTensor:
        identity = x.feats
        out = self.conv1(x)
        out = out.replace_feature(self.relu(self.bn1(out.feats)))
        out = self.conv2(out)
        return out.replace_feature(self.relu(self.bn2(out.feats) + identity))
