"""Slow, obvious voxelization: Python loops over points. The oracle for the fast paths.

Cell coordinates come from `point_cells`, the one formula every path shares (same float arithmetic,
so boundary points land in the same cell everywhere); the tests check it against numpy separately.
"""
from __future__ import annotations

from typing import Sequence

import torch

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)  # of the points


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Arithmetic dtype of the cell formula: float64 for float64 points, float32 otherwise (as the
    official CUDA kernel, which works in float)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def grid_size(voxel_size: Sequence[float], point_range: Sequence[float]) -> tuple[int, int, int]:
    """Cells per axis (nx, ny, nz) = round((max - min) / size) in float32, as the official op."""
    vs = torch.tensor([float(v) for v in voxel_size], dtype=torch.float32)
    lo = torch.tensor([float(v) for v in point_range[:3]], dtype=torch.float32)
    hi = torch.tensor([float(v) for v in point_range[3:]], dtype=torch.float32)
    return tuple(int(g) for g in torch.round((hi - lo) / vs).tolist())


def point_cells(points: torch.Tensor, voxel_size: Sequence[float], point_range: Sequence[float]) -> torch.Tensor:
    """(P, 3+) points → (P, 3) int32 cells (x, y, z) = floor((p - min) / size), rows of -1 outside the grid
    (or non-finite)."""
    ct = compute_dtype(points.dtype)
    grid = grid_size(voxel_size, point_range)
    lo = torch.tensor([float(v) for v in point_range[:3]], dtype=ct, device=points.device)
    vs = torch.tensor([float(v) for v in voxel_size], dtype=ct, device=points.device)
    c = torch.floor((points[:, :3].to(ct) - lo) / vs)
    inside = ((c >= 0) & (c < torch.tensor(grid, dtype=ct, device=points.device))).all(dim=1)
    return torch.where(inside[:, None], c.nan_to_num(-1.0).clamp(-1, 2**30).to(torch.int32),
                       torch.full_like(c, -1, dtype=torch.int32))


def hard_voxelize_reference(points: torch.Tensor, voxel_size, point_range, max_points: int, max_voxels: int):
    """Returns voxels (M, max_points, F), coords (M, 3) int32 (x, y, z), num_points (M,) int32 and
    slots (P,) int64 (voxel * max_points + position of each point, -1 if dropped)."""
    cells = point_cells(points, voxel_size, point_range).tolist()
    voxel_of_cell: dict[tuple[int, int, int], int] = {}
    coords: list[tuple[int, int, int]] = []
    members: list[list[int]] = []
    slots = [-1] * len(cells)
    for i, cell in enumerate(cells):
        cell = tuple(cell)
        if cell[0] < 0:
            continue
        v = voxel_of_cell.get(cell)
        if v is None:
            if len(coords) >= max_voxels:
                continue
            v = voxel_of_cell[cell] = len(coords)
            coords.append(cell)
            members.append([])
        if len(members[v]) < max_points:
            slots[i] = v * max_points + len(members[v])
            members[v].append(i)
    voxels = points.new_zeros((len(coords), max_points, points.shape[1]))
    for v, idx in enumerate(members):
        for k, i in enumerate(idx):
            voxels[v, k] = points[i]
    coords_t = torch.tensor(coords, dtype=torch.int32, device=points.device).reshape(-1, 3)
    num = torch.tensor([len(m) for m in members], dtype=torch.int32, device=points.device)
    return voxels, coords_t, num, torch.tensor(slots, dtype=torch.int64, device=points.device)


def voxelize_mean_reference(points: torch.Tensor, voxel_size, point_range):
    """Mean of all points per occupied cell (float64 sums), voxels in first-appearance order.
    Returns feats (M, F) in the points' dtype, coords (M, 3) int32, num_points (M,) int32."""
    cells = point_cells(points, voxel_size, point_range).tolist()
    pts = points.detach().double().tolist()
    order: dict[tuple[int, int, int], int] = {}
    sums: list[list[float]] = []
    counts: list[int] = []
    for p, cell in zip(pts, cells):
        cell = tuple(cell)
        if cell[0] < 0:
            continue
        v = order.setdefault(cell, len(order))
        if v == len(sums):
            sums.append([0.0] * len(p))
            counts.append(0)
        sums[v] = [a + b for a, b in zip(sums[v], p)]
        counts[v] += 1
    feats = torch.tensor([[s / n for s in row] for row, n in zip(sums, counts)], dtype=torch.float64)
    feats = feats.reshape(-1, points.shape[1]).to(points.dtype).to(points.device)
    coords = torch.tensor(list(order), dtype=torch.int32, device=points.device).reshape(-1, 3)
    return feats, coords, torch.tensor(counts, dtype=torch.int32, device=points.device)
