"""Slow, obvious oracles: dense conv3d on the scattered grid, a pair-loop sparse conv (the "reference"
backend of `conv.py`) and Python-loop kernel maps (the "reference" backend of `kmap.py`)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .tensor import SparseTensor, _triple, conv_out_shape, linear_keys


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


def pair_loop_conv(feats: torch.Tensor, weight: torch.Tensor, kmap) -> torch.Tensor:
    """out[o] += feats[i] @ weight[k] for every pair of a `KernelMap`, one offset at a time (plain torch, any
    device)."""
    out = feats.new_zeros(kmap.n_out, weight.shape[2])
    for k in range(kmap.kernel_volume):
        a, b = kmap.ptr[k], kmap.ptr[k + 1]
        if b > a:
            out.index_add_(0, kmap.out_idx[a:b], feats[kmap.in_idx[a:b]] @ weight[k])
    return out


def pair_loop_wgrad(feats: torch.Tensor, grad_out: torch.Tensor, kmap) -> torch.Tensor:
    """dW[k] = sum over the pairs (i, o) of offset k of outer(feats[i], grad_out[o]); (K, Cin, Cout)."""
    dw = feats.new_zeros(kmap.kernel_volume, feats.shape[1], grad_out.shape[1])
    for k in range(kmap.kernel_volume):
        a, b = kmap.ptr[k], kmap.ptr[k + 1]
        if b > a:
            dw[k] = feats[kmap.in_idx[a:b]].t() @ grad_out[kmap.out_idx[a:b]]
    return dw


# ----------------------------------------------------------------------------- kernel maps, Python loops
def _site_rows(coords: torch.Tensor) -> dict:
    rows: dict = {}
    for i, c in enumerate(coords.tolist()):
        if tuple(c) in rows:
            raise ValueError("sparse conv: duplicate coordinates in the input SparseTensor, e.g. (batch, x, y, z) = "
                             f"{c}")
        rows[tuple(c)] = i
    return rows


def subm_pairs(coords: torch.Tensor, offsets: torch.Tensor):
    """Pairs of a SubM map: for every offset d (row k of `offsets`, (K, 3)) and output site o, the input
    site o + d if it is active. Returns (in_idx, out_idx) int64 grouped by offset, and the K counts."""
    rows = _site_rows(coords)
    sites = coords.tolist()
    ins, outs, counts = [], [], []
    for dx, dy, dz in offsets.tolist():
        n = 0
        for o, (b, x, y, z) in enumerate(sites):
            i = rows.get((b, x + dx, y + dy, z + dz))
            if i is not None:
                ins.append(i)
                outs.append(o)
                n += 1
        counts.append(n)
    return torch.tensor(ins, dtype=torch.long), torch.tensor(outs, dtype=torch.long), counts


def conv_pairs(coords: torch.Tensor, spatial_shape, kernel_size, stride, padding, dilation):
    """Pairs of a strided conv (spconv's rule): input i feeds output o through offset (ix, iy, iz) when
    i = o*stride - padding + (ix, iy, iz)*dilation and o lies in the output grid.

    Returns (in_idx, out_idx, counts, out_keys): outputs numbered in increasing linear key
    ((b*X + x)*Y + y)*Z + z over the output grid, pairs grouped by offset.
    """
    ks, st, pad, dil = _triple(kernel_size), _triple(stride), _triple(padding), _triple(dilation)
    out_shape = conv_out_shape(spatial_shape, ks, st, pad, dil)
    _site_rows(coords)
    sites = coords.tolist()
    by_offset: list[list[tuple[int, tuple]]] = []
    for ix in range(ks[0]):
        for iy in range(ks[1]):
            for iz in range(ks[2]):
                pairs = []
                for i, (b, *xyz) in enumerate(sites):
                    o = []
                    for a, t in enumerate((ix, iy, iz)):
                        num = xyz[a] + pad[a] - t * dil[a]
                        if num < 0 or num % st[a] or num // st[a] >= out_shape[a]:
                            break
                        o.append(num // st[a])
                    else:
                        pairs.append((i, (b, *o)))
                by_offset.append(pairs)
    out_sites = sorted({o for pairs in by_offset for _, o in pairs})
    number = {o: n for n, o in enumerate(out_sites)}
    ins = [i for pairs in by_offset for i, _ in pairs]
    outs = [number[o] for pairs in by_offset for _, o in pairs]
    keys = linear_keys(torch.tensor(out_sites, dtype=torch.long).reshape(-1, 4), out_shape)
    return (torch.tensor(ins, dtype=torch.long), torch.tensor(outs, dtype=torch.long),
            [len(p) for p in by_offset], keys)


__all__ = ["conv_out_shape", "dense_conv", "dense_inverse_conv", "pair_loop_conv", "pair_loop_wgrad", "subm_pairs",
           "conv_pairs", "weight_to_dense"]
