"""The LiDAR backbone: a sparse 3D conv encoder whose output is flattened into a BEV map.

Module and parameter names follow the official SparseEncoder (`conv_input`, `encoder_layers.encoder_layer{i}`,
`conv_out`), so converted official checkpoints load strictly. Sparse-conv weights are
(kx*ky*kz, Cin, Cout); `tools/convert_checkpoint.py` reshapes the official (kx, ky, kz, Cin, Cout).
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch import nn

from bevfusion.models.layers import NormSpec, as_spec
from bevfusion.ops.sparse import SparseTensor
from bevfusion.ops.sparse.nn import SparseBasicBlock, SparseConv3d, SparseSequential, SubMConv3d

__all__ = ["SparseEncoder"]


def _conv_norm_act(conv: nn.Module, channels: int, norm: NormSpec) -> SparseSequential:
    return SparseSequential(conv, norm(channels, dims=1), nn.ReLU(inplace=True))


class SparseEncoder(nn.Module):
    """Sparse conv encoder (official `SparseEncoder`), output (B, C_out * Z_out, X_out, Y_out).

    Args:
        in_channels: voxel feature channels (5: x, y, z, intensity, time lag).
        sparse_shape: grid (X, Y, Z), e.g. [1440, 1440, 41].
        output_channels: channels of `conv_out`.
        order: must be ("conv", "norm", "act").
        norm_cfg: BatchNorm settings (default BN1d, eps 1e-3, momentum 0.01).
        base_channels: channels of `conv_input`.
        encoder_channels: per stage, the channels of its blocks; every stage but the last ends with a
            stride-2 SparseConv3d to its last entry.
        encoder_paddings: per stage, the padding of each block (only the strided convs use theirs).
        block_type: "basicblock" (residual SubM blocks) or "conv_module" (plain SubM conv blocks).
        impl: sparse-conv backend of every conv: "auto", "reference", "cpu" or "triton".
        dataflow: sparse-conv dataflow of every conv: "auto", or one the backend has ("gather", "im2col"
            for cpu; "igemm", "gather" for triton); see `bevfusion.ops.sparse.conv`.
    Input: voxel features (M, in_channels), coords (M, 4) int (batch, x, y, z), batch_size.
    """

    def __init__(self, in_channels: int, sparse_shape: Sequence[int], order: Sequence[str] = ("conv", "norm", "act"),
                 norm_cfg: NormSpec | Mapping[str, Any] | None = None, base_channels: int = 16, output_channels: int = 128,
                 encoder_channels: Sequence[Sequence[int]] = ((16,), (32, 32, 32), (64, 64, 64), (64, 64, 64)),
                 encoder_paddings: Sequence[Sequence[Any]] = ((1,), (1, 1, 1), (1, 1, 1), ((0, 1, 1), 1, 1)),
                 block_type: str = "conv_module", impl: str = "auto",
                 dataflow: str = "auto"):
        super().__init__()
        norm = as_spec(norm_cfg, NormSpec, {"type": "BN1d", "eps": 1e-3, "momentum": 0.01}, "norm_cfg")
        if tuple(order) != ("conv", "norm", "act"):
            raise ValueError(f"order {tuple(order)} is not supported (conv, norm, act)")
        if block_type not in ("basicblock", "conv_module"):
            raise ValueError(f"block_type must be 'basicblock' or 'conv_module', got {block_type!r}")
        if len(encoder_channels) != len(encoder_paddings):
            raise ValueError("encoder_channels and encoder_paddings need one entry per stage")
        self.sparse_shape = tuple(int(s) for s in sparse_shape)
        self.in_channels, self.output_channels = in_channels, output_channels
        self.conv_input = _conv_norm_act(
            SubMConv3d(in_channels, base_channels, 3, padding=1, bias=False, impl=impl, dataflow=dataflow),
            base_channels, norm)
        self.encoder_layers = SparseSequential()
        channels = base_channels
        last_stage = len(encoder_channels) - 1
        for i, (stage, paddings) in enumerate(zip(encoder_channels, encoder_paddings)):
            blocks = []
            for j, out_channels in enumerate(stage):
                padding = paddings[j]
                if j == len(stage) - 1 and i != last_stage:
                    conv = SparseConv3d(channels, out_channels, 3, stride=2, padding=padding, bias=False, impl=impl,
                                        dataflow=dataflow)
                    blocks.append(_conv_norm_act(conv, out_channels, norm))
                elif block_type == "basicblock":
                    if out_channels != channels:
                        raise ValueError(f"encoder_layer{i + 1}: a basic block keeps its channels "
                                         f"({channels} → {out_channels})")
                    bn = norm(out_channels, dims=1)
                    blocks.append(SparseBasicBlock(out_channels, 3, norm_eps=bn.eps, norm_momentum=bn.momentum,
                                                   impl=impl, dataflow=dataflow))
                else:
                    conv = SubMConv3d(channels, out_channels, 3, padding=padding, bias=False, impl=impl,
                                      dataflow=dataflow)
                    blocks.append(_conv_norm_act(conv, out_channels, norm))
                channels = out_channels
            self.encoder_layers.add_module(f"encoder_layer{i + 1}", SparseSequential(*blocks))
        self.conv_out = _conv_norm_act(
            SparseConv3d(channels, output_channels, (1, 1, 3), stride=(1, 1, 2), padding=0, bias=False, impl=impl,
                         dataflow=dataflow),
            output_channels, norm)

    def forward(self, voxel_features: torch.Tensor, coords: torch.Tensor, batch_size: int,
                **kwargs) -> torch.Tensor:
        x = SparseTensor(voxel_features, coords.int(), self.sparse_shape, batch_size=batch_size)
        x = self.conv_input(x)
        x = self.encoder_layers(x)
        x = self.conv_out(x)
        return x.to_bev()
