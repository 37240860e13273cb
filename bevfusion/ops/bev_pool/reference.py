"""Slow, obvious torch versions of BEV pooling: the oracle for the tests.

They accumulate in float64 (so they are a tight reference for fp32 / fp16 / bf16) and are
differentiable through plain torch autograd.
"""
from __future__ import annotations

from typing import Sequence

import torch


def bev_pool_reference(feats: torch.Tensor, coords: torch.Tensor, batch_size: int,
                       grid: Sequence[int]) -> torch.Tensor:
    """Sum the features of points that share a BEV cell, straight from the coordinates.

    Args:
        feats: (N, C) float.
        coords: (N, 4) int, columns (x, y, z, batch) in cell units.
        batch_size: B; points with a batch index outside [0, B) are dropped.
        grid: (D, H, W) = (Z, X, Y) cells; points outside the grid are dropped.
    Returns:
        (B, C, D, H, W) in the dtype of `feats`, with out[b, :, z, x, y] = sum of feats at (x, y, z, b).
    """
    d, h, w = (int(v) for v in grid)
    c = coords.long()
    x, y, z, b = c.unbind(1)
    keep = (x >= 0) & (x < h) & (y >= 0) & (y < w) & (z >= 0) & (z < d) & (b >= 0) & (b < batch_size)
    out = feats.new_zeros((batch_size, d, h, w, feats.shape[1]), dtype=torch.float64)
    out = out.index_put((b[keep], z[keep], x[keep], y[keep]), feats[keep].double(), accumulate=True)
    return out.permute(0, 4, 1, 2, 3).to(feats.dtype)


def pool_cells_reference(feats: torch.Tensor, point_cells: torch.Tensor, num_cells: int) -> torch.Tensor:
    """(N, C) features and (N,) cell ids (-1 = dropped) -> (G, C) cell sums, in the features' dtype."""
    keep = point_cells >= 0
    out = feats.new_zeros((num_cells, feats.shape[1]), dtype=torch.float64)
    out = out.index_add(0, point_cells[keep], feats[keep].double())
    return out.to(feats.dtype)


def lift_reference(depth: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
    """The frustum features that the fused op never materialises.

    Args:
        depth: (BN, D, fH, fW) depth probabilities.
        feats: (BN, fH, fW, C) image features (channels last).
    Returns:
        (BN * D * fH * fW, C): row ((n * D + d) * fH + v) * fW + u holds depth[n, d, v, u] * feats[n, v, u].
    """
    out = depth.unsqueeze(-1) * feats.unsqueeze(1)  # (BN, D, fH, fW, C)
    return out.reshape(-1, feats.shape[-1])
