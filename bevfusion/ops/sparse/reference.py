"""Slow, obvious oracles: dense conv3d on the scattered grid, and a pair-loop sparse conv."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .kmap import KernelMap, conv_out_shape
from .tensor import SparseTensor, _triple


def weight_to_dense(weight: torch.Tensor, kernel_size) -> torch.Tensor:
    """[K, Cin, Cout] -> F.conv3d layout [Cout, Cin, kx, ky, kz]."""
    kx, ky, kz = _triple(kernel_size)
    return weight.reshape(kx, ky, kz, weight.shape[1], weight.shape[2]).permute(4, 3, 0, 1, 2)


def dense_conv(x: SparseTensor, weight: torch.Tensor, kernel_size, stride=1, padding=0, dilation=1,
               subm: bool = False, bias: torch.Tensor | None = None):
    """Reference for SubMConv3d / SparseConv3d: dense conv3d, read at the sparse output sites.

    Returns (out_coords (M, 4) long sorted by (b, x, y, z), out_feats (M, Cout), out_shape).
    The active output sites of a strided conv are those whose window covers an active input.
    """
    ks, st, pad, dil = _triple(kernel_size), _triple(stride), _triple(padding), _triple(dilation)
    dense = x.dense()
    if subm:
        pad = tuple((k - 1) // 2 * d for k, d in zip(ks, dil))
        st = (1, 1, 1)
    y = F.conv3d(dense, weight_to_dense(weight, ks), bias, st, pad, dil)
    if subm:
        c = x.coords.long()
    else:
        occ = torch.zeros(dense.shape[0], 1, *dense.shape[2:], dtype=torch.float64)
        if x.coords.shape[0]:
            cc = x.coords.long()
            occ[cc[:, 0], 0, cc[:, 1], cc[:, 2], cc[:, 3]] = 1.0
        hits = F.conv3d(occ, torch.ones(1, 1, *ks, dtype=torch.float64), None, st, pad, dil)[:, 0]
        c = (hits > 0.5).nonzero()
    feats = y[c[:, 0], :, c[:, 1], c[:, 2], c[:, 3]]
    out_shape = tuple(y.shape[2:]) if not subm else x.spatial_shape
    return c, feats, out_shape


def dense_inverse_conv(x: SparseTensor, weight: torch.Tensor, kernel_size, stride, padding, dilation,
                       fine_coords: torch.Tensor, fine_shape) -> torch.Tensor:
    """Reference for SparseInverseConv3d: dense conv_transpose3d read at the finer sites `fine_coords`."""
    ks, st, pad, dil = _triple(kernel_size), _triple(stride), _triple(padding), _triple(dilation)
    w = weight.reshape(*ks, weight.shape[1], weight.shape[2]).permute(3, 4, 0, 1, 2)  # (Cin, Cout, kx, ky, kz)
    base = [(o - 1) * s - 2 * p + d * (k - 1) + 1 for o, s, p, d, k in zip(x.spatial_shape, st, pad, dil, ks)]
    outpad = [f - b for f, b in zip(fine_shape, base)]
    y = F.conv_transpose3d(x.dense(), w, None, st, pad, outpad, 1, dil)
    c = fine_coords.long()
    return y[c[:, 0], :, c[:, 1], c[:, 2], c[:, 3]]


def pair_loop_conv(feats: torch.Tensor, weight: torch.Tensor, kmap: KernelMap) -> torch.Tensor:
    """out[o] += feats[i] @ weight[k] for every pair, one offset at a time (plain torch, any device)."""
    out = feats.new_zeros(kmap.n_out, weight.shape[2])
    for k in range(kmap.kernel_volume):
        a, b = kmap.ptr[k], kmap.ptr[k + 1]
        if b > a:
            out.index_add_(0, kmap.out_idx[a:b], feats[kmap.in_idx[a:b]] @ weight[k])
    return out


__all__ = ["conv_out_shape", "dense_conv", "dense_inverse_conv", "pair_loop_conv", "weight_to_dense"]
