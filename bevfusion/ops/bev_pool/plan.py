"""The plan of BEV pooling: which points are kept, which cell each one lands in, and the points grouped
by cell (a CSR over all output cells). This file holds the data class, the input checks and the plan's
torch build (`plan_tensors`, any device: the GPU path and the reference); the numba build is
`cpu.plan_arrays`, and `bevfusion.ops.bev_pool.bev_pool_plan` picks one by `impl`.

Everything here depends on the coordinates only, never on the features, so a fixed camera rig with a
fixed augmentation (inference) builds the plan once and reuses it for every frame: the reduction then
does no masking, no ranking and no sort.
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Sequence

import torch

_INT_DTYPES = (torch.int16, torch.int32, torch.int64, torch.uint8, torch.int8)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)  # of the features


@dataclass(frozen=True, eq=False)
class BevPoolPlan:
    """Kept points sorted by output cell, plus the intervals that the reduction walks.

    Cells are numbered in the memory order of the channels-last output (B, D, H, W, C):
    ``cell = ((b * D + z) * H + x) * W + y``. This "rank" orders the points exactly like the official
    rank (any bijective rank gives the same intervals; only the order of the intervals differs).

    Attributes:
        batch_size: B.
        grid: (D, H, W) = (Z cells, X cells, Y cells).
        num_points: N, the number of input points (kept or not); features must have N rows.
        order: (K,) int64, indices into the N input points of the K kept points, sorted by cell
            (stable: points of one cell keep their input order).
        ranks: (K,) int64, the cell of each point in ``order``.
        point_cells: (N,) int64, the cell of every input point, -1 for dropped points (used by the
            backward pass, which is a pure gather).
        interval_starts: (M,) int64, position in ``order`` of the first point of each non-empty cell.
        interval_lengths: (M,) int64, points in that cell (>= 1).
        interval_cells: (M,) int64, the cell id of each interval, increasing.
        cell_ptr: (G + 1,) int64, CSR pointers over all G = B*D*H*W cells: the points of cell g are
            ``order[cell_ptr[g]:cell_ptr[g + 1]]`` (empty for empty cells).
        launch_cells: (G,) int64, all cells, non-empty ones first and longest first (ties by cell
            id), then the empty ones; the Triton kernel runs one program per entry, so long
            intervals start early and every output element is written exactly once (no memset).
    """

    batch_size: int
    grid: tuple
    num_points: int
    order: torch.Tensor
    ranks: torch.Tensor
    point_cells: torch.Tensor
    interval_starts: torch.Tensor
    interval_lengths: torch.Tensor
    interval_cells: torch.Tensor
    cell_ptr: torch.Tensor
    launch_cells: torch.Tensor

    @property
    def num_cells(self) -> int:
        """G = B * D * H * W, the number of output cells."""
        d, h, w = self.grid
        return self.batch_size * d * h * w

    @property
    def num_kept(self) -> int:
        return int(self.order.numel())

    @property
    def num_intervals(self) -> int:
        return int(self.interval_starts.numel())

    @property
    def device(self) -> torch.device:
        return self.order.device

    def to(self, device) -> "BevPoolPlan":
        """The same plan with every tensor on `device`."""
        moved = {f.name: getattr(self, f.name).to(device) for f in fields(self)
                 if isinstance(getattr(self, f.name), torch.Tensor)}
        return replace(self, **moved)


def _check_grid(batch_size, grid) -> tuple:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"bev_pool: batch_size must be a positive int, got {batch_size!r}")
    try:
        grid = tuple(int(g) for g in grid)
    except TypeError:
        raise ValueError(f"bev_pool: grid must be (D, H, W), got {grid!r}") from None
    if len(grid) != 3 or min(grid) < 1:
        raise ValueError(f"bev_pool: grid must be three positive ints (D, H, W), got {grid!r}")
    return grid


def check_coords(coords: torch.Tensor) -> None:
    if not isinstance(coords, torch.Tensor):
        raise TypeError(f"bev_pool: coords must be a tensor, got {type(coords).__name__}")
    if coords.dtype not in _INT_DTYPES:
        raise TypeError(f"bev_pool: coords must be an integer tensor (x, y, z, batch), got {coords.dtype}")
    if coords.dim() != 2 or coords.shape[1] != 4:
        raise ValueError(f"bev_pool: coords must be (N, 4) with columns (x, y, z, batch), got {tuple(coords.shape)}")


def point_cells(coords: torch.Tensor, batch_size: int, grid: Sequence[int]) -> torch.Tensor:
    """Cell id of every point, -1 for points outside the grid or with a batch index outside [0, B).

    Args:
        coords: (N, 4) int, columns (x, y, z, batch) in cell units.
    Returns:
        (N,) int64, ``((b * D + z) * H + x) * W + y`` or -1.
    """
    d, h, w = grid
    c = coords.long()
    x, y, z, b = c.unbind(1)
    keep = (x >= 0) & (x < h) & (y >= 0) & (y < w) & (z >= 0) & (z < d) & (b >= 0) & (b < batch_size)
    cells = ((b * d + z) * h + x) * w + y
    return torch.where(keep, cells, torch.full_like(cells, -1))


def plan_tensors(coords: torch.Tensor, batch_size: int, grid: Sequence[int]) -> tuple:
    """The plan's tensors from torch ops (a stable sort, a bincount and prefix sums), on the device of
    `coords`, in `BevPoolPlan` field order after num_points: (point_cells, order, ranks, interval_starts,
    interval_lengths, interval_cells, cell_ptr, launch_cells). Same values as `cpu.plan_arrays`."""
    device = coords.device
    g = batch_size * grid[0] * grid[1] * grid[2]
    cells = point_cells(coords, batch_size, grid)
    kept = (cells >= 0).nonzero().squeeze(1)
    kept_cells = cells[kept]
    # 32-bit keys halve the radix-sort passes whenever the cell ids fit.
    keys = kept_cells.to(torch.int32) if g < 2**31 else kept_cells
    perm = torch.sort(keys, stable=True).indices
    order = kept[perm]
    counts = torch.bincount(kept_cells, minlength=g)
    cell_ptr = torch.zeros(g + 1, dtype=torch.int64, device=device)
    torch.cumsum(counts, 0, out=cell_ptr[1:])
    ranks = cells[order]
    interval_cells = (counts > 0).nonzero().squeeze(1)
    interval_starts = cell_ptr[interval_cells]
    interval_lengths = counts[interval_cells]
    # Longest first, ties by cell id (stable sort over cells that are already increasing).
    launch_cells = torch.sort(counts, descending=True, stable=True).indices
    return cells, order, ranks, interval_starts, interval_lengths, interval_cells, cell_ptr, launch_cells


def make_plan(coords: torch.Tensor, batch_size: int, grid: tuple, tensors: tuple, drop_outside: bool) -> BevPoolPlan:
    """The `BevPoolPlan` of `tensors` (from `plan_tensors` or `cpu.plan_arrays`); with drop_outside=False a
    point outside the grid raises ValueError naming the first one."""
    cells, order, ranks, interval_starts, interval_lengths, interval_cells, cell_ptr, launch_cells = tensors
    n = coords.shape[0]
    if not drop_outside:
        bad = (cells < 0).nonzero()
        if bad.numel():
            i = int(bad[0, 0])
            raise ValueError(
                f"bev_pool_plan(drop_outside=False): {bad.shape[0]} of {n} points lie outside the grid "
                f"(D, H, W) = {grid} with batch_size {batch_size}; first is point {i} with "
                f"(x, y, z, batch) = {tuple(coords[i].tolist())}")
    return BevPoolPlan(batch_size=batch_size, grid=grid, num_points=n, order=order, ranks=ranks,
                       point_cells=cells, interval_starts=interval_starts, interval_lengths=interval_lengths,
                       interval_cells=interval_cells, cell_ptr=cell_ptr, launch_cells=launch_cells)
