"""Gaussian heatmap targets of the CenterPoint and TransFusion heads (CenterPoint's radius and splat)."""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

__all__ = ["gaussian_radius", "gaussian_2d", "draw_heatmap_gaussian"]


def gaussian_radius(det_size: Sequence[float], min_overlap: float = 0.5) -> float:
    """CenterPoint's radius: the smallest of the three CornerNet cases for a (height, width) box in cells.

    (The CenterPoint/mmdet3d form divides each root by 2, not 2a; kept for identical targets.)
    """
    height, width = float(det_size[0]), float(det_size[1])
    a1, b1 = 1.0, height + width
    c1 = width * height * (1 - min_overlap) / (1 + min_overlap)
    r1 = (b1 + math.sqrt(b1 ** 2 - 4 * a1 * c1)) / 2
    a2, b2 = 4.0, 2 * (height + width)
    c2 = (1 - min_overlap) * width * height
    r2 = (b2 + math.sqrt(b2 ** 2 - 4 * a2 * c2)) / 2
    a3, b3 = 4 * min_overlap, -2 * min_overlap * (height + width)
    c3 = (min_overlap - 1) * width * height
    r3 = (b3 + math.sqrt(b3 ** 2 - 4 * a3 * c3)) / 2
    return min(r1, r2, r3)


def gaussian_2d(shape: Sequence[int], sigma: float = 1.0) -> np.ndarray:
    """Unnormalised (h, w) Gaussian centred in the array; values below eps · max are zeroed (float64)."""
    m, n = [(s - 1.0) / 2.0 for s in shape]
    y, x = np.ogrid[-m:m + 1, -n:n + 1]
    g = np.exp(-(x * x + y * y) / (2 * sigma * sigma))
    g[g < np.finfo(g.dtype).eps * g.max()] = 0
    return g


def draw_heatmap_gaussian(heatmap: torch.Tensor, center: Sequence[int], radius: int, k: float = 1.0) -> torch.Tensor:
    """Max a (2r+1)² Gaussian (sigma = (2r+1)/6) into `heatmap` in place, clipped at the borders.

    Args:
        heatmap: (H, W). center: integer (col, row) — CenterPoint's (x, y) order: `center[0]` indexes the
            last axis. radius: int ≥ 0. k: peak value.
    Returns:
        `heatmap` (modified in place).
    """
    radius = int(radius)
    diameter = 2 * radius + 1
    gaussian = torch.from_numpy(gaussian_2d((diameter, diameter), sigma=diameter / 6))
    x, y = int(center[0]), int(center[1])
    height, width = heatmap.shape[:2]
    left, right = min(x, radius), min(width - x, radius + 1)
    top, bottom = min(y, radius), min(height - y, radius + 1)
    masked = heatmap[y - top:y + bottom, x - left:x + right]
    g = gaussian[radius - top:radius + bottom, radius - left:radius + right].to(heatmap)
    if min(g.shape) > 0 and min(masked.shape) > 0:
        torch.max(masked, g * k, out=masked)
    return heatmap
