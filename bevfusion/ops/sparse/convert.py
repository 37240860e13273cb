"""Sparse-conv weight layout converters.

Ours: (kx*ky*kz, Cin, Cout), offset k = (ix*ky + iy)*kz + iz, oriented like F.conv3d.
spconv 1.x (official BEVFusion checkpoints): (kx, ky, kz, Cin, Cout), same orientation.
spconv 2.x: (Cout, kx, ky, kz, Cin).
"""
from __future__ import annotations

import torch


def from_spconv1(w: torch.Tensor) -> torch.Tensor:
    """(kx, ky, kz, Cin, Cout) -> (K, Cin, Cout)."""
    if w.dim() != 5:
        raise ValueError(f"from_spconv1: expected (kx, ky, kz, Cin, Cout), got {tuple(w.shape)}")
    return w.reshape(-1, w.shape[3], w.shape[4]).contiguous()


def to_spconv1(w: torch.Tensor, kernel_size) -> torch.Tensor:
    """(K, Cin, Cout) -> (kx, ky, kz, Cin, Cout)."""
    kx, ky, kz = kernel_size
    return w.reshape(kx, ky, kz, w.shape[1], w.shape[2]).contiguous()


def from_spconv2(w: torch.Tensor) -> torch.Tensor:
    """(Cout, kx, ky, kz, Cin) -> (K, Cin, Cout)."""
    if w.dim() != 5:
        raise ValueError(f"from_spconv2: expected (Cout, kx, ky, kz, Cin), got {tuple(w.shape)}")
    return w.permute(1, 2, 3, 4, 0).reshape(-1, w.shape[4], w.shape[0]).contiguous()


def to_spconv2(w: torch.Tensor, kernel_size) -> torch.Tensor:
    """(K, Cin, Cout) -> (Cout, kx, ky, kz, Cin)."""
    kx, ky, kz = kernel_size
    return w.reshape(kx, ky, kz, w.shape[1], w.shape[2]).permute(4, 0, 1, 2, 3).contiguous()


def to_conv3d(w: torch.Tensor, kernel_size) -> torch.Tensor:
    """(K, Cin, Cout) -> F.conv3d's (Cout, Cin, kx, ky, kz)."""
    kx, ky, kz = kernel_size
    return w.reshape(kx, ky, kz, w.shape[1], w.shape[2]).permute(4, 3, 0, 1, 2).contiguous()


def convert_weight(w: torch.Tensor, kernel_size, cin: int, cout: int) -> torch.Tensor:
    """Any of ours / spconv-1 / spconv-2 layouts -> ours, recognised by shape.

    A cubic kernel with Cin == Cout is ambiguous between the 5-D layouts only when kx == Cout; the
    spconv-1 reading (the official checkpoints) wins then.
    """
    kx, ky, kz = kernel_size
    K = kx * ky * kz
    shape = tuple(w.shape)
    if shape == (K, cin, cout):
        return w
    if shape == (kx, ky, kz, cin, cout):
        return from_spconv1(w)
    if shape == (cout, kx, ky, kz, cin):
        return from_spconv2(w)
    raise ValueError(f"sparse conv weight of shape {shape} fits none of (K, Cin, Cout) = {(K, cin, cout)}, "
                     f"spconv-1 {(kx, ky, kz, cin, cout)} or spconv-2 {(cout, kx, ky, kz, cin)}")
