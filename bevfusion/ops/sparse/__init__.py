"""Sparse 3D convolution engine (TorchSparse-style): SparseTensor, kernel maps, dataflows, nn modules.

Files: tensor.py (SparseTensor), kmap.py (kernel maps and their derived tables; kmap_numba.py builds them
on the CPU), dataflows.py (torch dataflows), triton.py (Triton kernels), tune.py (per-layer dataflow
choice), conv.py (backend / dataflow dispatch, autograd, functional API), nn.py (modules), reference.py
(oracles), convert.py (weight layouts). `impl` / `dataflow` names: see conv.py.

`import bevfusion.ops.sparse` needs torch only; numba and Triton are imported when a CPU kernel map or a
Triton path is first used.
"""
from .conv import DATAFLOWS, IMPLS, conv_features, sparse_conv3d, sparse_inverse_conv3d, subm_conv3d
from .convert import convert_weight, from_spconv1, from_spconv2, to_conv3d, to_spconv1, to_spconv2
from .kmap import KernelMap, build_conv_kmap, build_subm_kmap
from .tensor import SparseTensor
from . import nn

__all__ = [
    "IMPLS", "DATAFLOWS",
    "SparseTensor", "KernelMap", "build_subm_kmap", "build_conv_kmap", "conv_features", "subm_conv3d",
    "sparse_conv3d", "sparse_inverse_conv3d", "convert_weight", "from_spconv1", "from_spconv2", "to_spconv1",
    "to_spconv2", "to_conv3d", "nn",
]
