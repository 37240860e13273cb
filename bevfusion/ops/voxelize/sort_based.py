"""Sort-based first-come voxel assignment from torch ops, on any device: the host part of the "triton"
path (`triton.py` passes its own kernel for the per-point cells and keys).

One stable sort by cell key, segment starts, voxels ranked by their first point: the same voxels, order,
slots and counts as the one-pass hash table of `cpu.py` and the loop of `reference.py`. With the torch
cell formula (`cells_and_keys_torch`) it is a complete plain-torch voxelization (`hard_voxelize_sorted`),
which the benchmark times as its baseline.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from .reference import grid_size


def cells_and_keys_torch(points: torch.Tensor, voxel_size, point_range):
    """(P, 3) int32 cells (-1 rows outside) and (P,) int64 keys (x*ny + y)*nz + z, grid volume outside."""
    from .reference import point_cells

    nx, ny, nz = grid_size(voxel_size, point_range)
    cells = point_cells(points, voxel_size, point_range)
    c = cells.long()
    keys = (c[:, 0] * ny + c[:, 1]) * nz + c[:, 2]
    keys = torch.where(cells[:, 0] >= 0, keys, torch.full_like(keys, nx * ny * nz))
    return cells, keys


def assign_sorted(points: torch.Tensor, voxel_size, point_range, max_points: int, max_voxels: int,
                  cells_and_keys: Optional[Callable] = None):
    """First-come assignment from one stable sort. Same outputs as `assign_numba`, on any device."""
    cells, keys = (cells_and_keys or cells_and_keys_torch)(points, voxel_size, point_range)
    nx, ny, nz = grid_size(voxel_size, point_range)
    sentinel = nx * ny * nz
    p, dev = keys.shape[0], keys.device
    if p == 0:
        return (torch.zeros(0, 3, dtype=torch.int32, device=dev), torch.zeros(0, dtype=torch.int64, device=dev),
                torch.zeros(0, dtype=torch.int64, device=dev))
    sorted_keys, perm = torch.sort(keys, stable=True)  # stable: within a cell, points stay in input order
    new_seg = torch.ones(p, dtype=torch.bool, device=dev)
    new_seg[1:] = sorted_keys[1:] != sorted_keys[:-1]
    starts = torch.nonzero(new_seg).squeeze(1)  # (U,)
    seg_id = torch.cumsum(new_seg, 0) - 1
    seg_len = torch.diff(starts, append=torch.tensor([p], device=dev))
    seg_valid = sorted_keys[starts] < sentinel
    first = torch.where(seg_valid, perm[starts], torch.full_like(starts, p))  # first point of each cell
    order = torch.argsort(first)  # first points are distinct: a deterministic order
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel(), device=dev)
    m = min(int(seg_valid.sum()), max_voxels)
    pos = torch.arange(p, device=dev) - starts[seg_id]
    vid = rank[seg_id]
    keep = (sorted_keys < sentinel) & (vid < m) & (pos < max_points)
    slots = torch.full((p,), -1, dtype=torch.int64, device=dev)
    slots[perm] = torch.where(keep, vid * max_points + pos, torch.full_like(pos, -1))
    kept_segs = order[:m]  # segment of voxel 0, 1, ... m-1
    coords = cells[first[kept_segs]]
    counts = seg_len[kept_segs]
    return coords, counts, slots


def scatter_slots_torch(points: torch.Tensor, slots: torch.Tensor, m: int, max_points: int) -> torch.Tensor:
    """(m, max_points, F) voxels, zero-padded: voxels.view(-1, F)[slots[i]] = points[i] for kept points."""
    out = points.new_zeros((m * max_points, points.shape[1]))
    keep = slots >= 0
    out[slots[keep]] = points[keep]
    return out.view(m, max_points, points.shape[1])


def hard_voxelize_sorted(points: torch.Tensor, voxel_size, point_range, max_points: int, max_voxels: int):
    """`voxelize` from torch ops alone (torch cells, `assign_sorted`, `scatter_slots_torch`), any device:
    no impl selects it; benchmarks/bench_voxelize.py times it as the plain-torch baseline."""
    coords, counts, slots = assign_sorted(points, voxel_size, point_range, max_points, max_voxels)
    voxels = scatter_slots_torch(points.detach(), slots, coords.shape[0], max_points)
    return voxels, coords, counts.clamp(max=max_points).to(torch.int32), slots
