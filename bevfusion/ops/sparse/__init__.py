"""Sparse 3D convolution engine (TorchSparse-style): SparseTensor, kernel maps, dataflows, nn modules.

`import bevfusion.ops.sparse` needs torch only; Triton is imported when a Triton path is first used.
"""
from .conv import conv_features, sparse_conv3d, sparse_inverse_conv3d, subm_conv3d
from .convert import convert_weight, from_spconv1, from_spconv2, to_conv3d, to_spconv1, to_spconv2
from .kmap import KernelMap, build_conv_kmap, build_subm_kmap
from .tensor import SparseTensor
from . import nn

__all__ = [
    "SparseTensor", "KernelMap", "build_subm_kmap", "build_conv_kmap", "conv_features", "subm_conv3d",
    "sparse_conv3d", "sparse_inverse_conv3d", "convert_weight", "from_spconv1", "from_spconv2", "to_spconv1",
    "to_spconv2", "to_conv3d", "nn",
]
