"""The "cpu" path of voxelization: numba.

`hard_voxelize_numba` / `assign_numba`: one sequential pass over the points with an open-addressing hash
table (cell key → voxel id), which *is* the first-come definition: voxel ids follow first appearance,
later points of a full voxel and later voxels past `max_voxels` are dropped. O(P), no sort, no dense grid
(1440 x 1440 x 40 cells would be 332 MB of int32).

numba is imported with this module (through `bevfusion.ops._numba`), which `bevfusion.ops.voxelize`
imports only when the CPU path runs; the kernels are compiled on first call and cached on disk. Cells are
computed in float32 (float64 for float64 points) with the same IEEE operations as
`reference.point_cells`, so every path puts a boundary point in the same cell.
"""
from __future__ import annotations

import numpy as np
import torch

from .._numba import jit as _jit
from .reference import compute_dtype, grid_size


@_jit
def _nb_cell_key(p, i, lo, vs, nx, ny, nz):
    cx = np.floor((p[i, 0] - lo[0]) / vs[0])
    cy = np.floor((p[i, 1] - lo[1]) / vs[1])
    cz = np.floor((p[i, 2] - lo[2]) / vs[2])
    # written as "not inside" so NaN coordinates count as outside
    if not (cx >= 0 and cx < nx and cy >= 0 and cy < ny and cz >= 0 and cz < nz):
        return -1, 0, 0, 0
    ix, iy, iz = int(cx), int(cy), int(cz)
    return (ix * ny + iy) * nz + iz, ix, iy, iz

@_jit
def _nb_lookup(table_keys, key, mask):
    h = ((key ^ (key >> 17)) * 0x5851F42D4C957F2D) >> 21  # multiplicative hash, int64 wraps
    h = h & mask
    while table_keys[h] != -1 and table_keys[h] != key:
        h = (h + 1) & mask
    return h

@_jit
def _nb_assign(p, lo, vs, nx, ny, nz, max_points, max_voxels, table_keys, table_vals,
           coords, counts, slots):
    """slots[i] = voxel * max_points + position (or -1); counts are uncapped occupancy of kept voxels."""
    mask = table_keys.shape[0] - 1
    nvox = 0
    for i in range(p.shape[0]):
        key, ix, iy, iz = _nb_cell_key(p, i, lo, vs, nx, ny, nz)
        slots[i] = -1
        if key < 0:
            continue
        h = _nb_lookup(table_keys, key, mask)
        if table_keys[h] == -1:
            if nvox >= max_voxels:
                continue
            table_keys[h] = key
            table_vals[h] = nvox
            coords[nvox, 0] = ix
            coords[nvox, 1] = iy
            coords[nvox, 2] = iz
            nvox += 1
        v = table_vals[h]
        n = counts[v]
        if n < max_points:
            slots[i] = v * max_points + n
        counts[v] = n + 1
    return nvox

@_jit
def _nb_fill(p, slots, out):
    f = p.shape[1]
    for i in range(p.shape[0]):
        s = slots[i]
        if s >= 0:
            for j in range(f):
                out[s, j] = p[i, j]


def _table_size(n: int) -> int:
    return 1 << max(4, int(2 * max(n, 1) - 1).bit_length())


def _range_arrays(voxel_size, point_range, dtype):
    nd = np.float64 if dtype == torch.float64 else np.float32
    return (np.asarray([float(v) for v in point_range[:3]], dtype=nd),
            np.asarray([float(v) for v in voxel_size], dtype=nd))


def assign_numba(points: torch.Tensor, voxel_size, point_range, max_points: int, max_voxels: int):
    """First-come assignment. Returns coords (M, 3) int32, counts (M,) int64 (uncapped), slots (P,) int64."""
    ct = compute_dtype(points.dtype)
    xyz = points[:, :3].detach().to(ct).contiguous().numpy()
    lo, vs = _range_arrays(voxel_size, point_range, ct)
    nx, ny, nz = grid_size(voxel_size, point_range)
    p = xyz.shape[0]
    cap = min(p, max_voxels)
    size = _table_size(cap)
    table_keys = np.full(size, -1, dtype=np.int64)
    table_vals = np.zeros(size, dtype=np.int64)
    coords = np.zeros((cap, 3), dtype=np.int32)
    counts = np.zeros(cap, dtype=np.int64)
    slots = np.empty(p, dtype=np.int64)
    m = _nb_assign(xyz, lo, vs, nx, ny, nz, max_points, max_voxels, table_keys, table_vals, coords, counts, slots)
    return torch.from_numpy(coords[:m]), torch.from_numpy(counts[:m]), torch.from_numpy(slots)


def hard_voxelize_numba(points: torch.Tensor, voxel_size, point_range, max_points: int, max_voxels: int):
    coords, counts, slots = assign_numba(points, voxel_size, point_range, max_points, max_voxels)
    m, f = coords.shape[0], points.shape[1]
    feats = points.detach().to(compute_dtype(points.dtype)).contiguous().numpy()
    out = np.zeros((m * max_points, f), dtype=feats.dtype)
    _nb_fill(feats, slots.numpy(), out)
    voxels = torch.from_numpy(out).view(m, max_points, f).to(points.dtype)
    return voxels, coords, counts.clamp(max=max_points).to(torch.int32), slots
