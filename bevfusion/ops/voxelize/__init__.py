"""Voxelization of LiDAR points (BEVFusion's first LiDAR step), hard and dynamic / mean.

Semantics (facts §3.6, the official deterministic hard voxelization):

* grid = round((max - min) / size) per axis (1440 x 1440 x 40 for 0.075 x 0.075 x 0.2 over ±54 m,
  z -5..3); a point's cell = floor((p - min) / size), computed in float32 (float64 for float64 points)
  as the official kernel does; points outside the grid (or with non-finite coordinates) are dropped.
* voxels are numbered in **first-appearance order** of their points; at most `max_points` points
  per voxel are kept (later ones dropped) and at most `max_voxels` voxels (later ones dropped).
  Counts are capped at `max_points`. The result depends only on the input order: deterministic on
  every path, and every path gives the same result bit for bit.
* **coords are (x, y, z)** cell indices, as in the BEVFusion fork (upstream mmdet3d uses (z, y, x)).
  The model prepends the batch index per sample, giving (batch, x, y, z) rows (facts §2.1).

Functions: `voxelize` (hard), `voxel_mean` (BEVFusion's voxelize_reduce: sum / count),
`dynamic_voxelize` (per-point cells), `voxelize_mean` (DynamicScatter-style mean over all points of
each cell), `grid_size`, and the parameter-free modules `Voxelization` (hard) and `DynamicScatter`
(dynamic, mean per voxel), neither with state_dict entries.

Implementations (`impl`, the ops' backends: `bevfusion.ops._dispatch`): "reference" (Python loops: the
oracle), "cpu" (numba hash-table pass over the points: cpu.py), "triton" (Triton cell and scatter
kernels around the sort-based assignment of sort_based.py; CUDA tensors, or CPU tensors under
TRITON_INTERPRET=1) and "auto" (triton for CUDA tensors, cpu otherwise). Importing this package needs
torch only.
"""
from __future__ import annotations

import math
import numbers
from typing import Sequence, Union

import torch

from bevfusion.ops._dispatch import resolve_impl
from torch import nn

from .reference import grid_size as _grid_size
from .reference import SUPPORTED_DTYPES, hard_voxelize_reference, point_cells, voxelize_mean_reference

__all__ = ["voxelize", "voxel_mean", "dynamic_voxelize", "voxelize_mean", "grid_size", "Voxelization", "DynamicScatter",
           "IMPLS"]

IMPLS = ("auto", "reference", "cpu", "triton")


# ----------------------------------------------------------------------------- checks and dispatch
def _floats(name: str, values, n: int) -> list[float]:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().reshape(-1).tolist()
    try:
        out = [float(v) for v in values]
    except (TypeError, ValueError):
        raise TypeError(f"voxelize: {name} must be {n} numbers, got {values!r}") from None
    if len(out) != n or not all(math.isfinite(v) for v in out):
        raise ValueError(f"voxelize: {name} must be {n} finite numbers, got {values!r}")
    return out


def _check_geometry(voxel_size, point_range) -> tuple[list[float], list[float], tuple[int, int, int]]:
    vs = _floats("voxel_size", voxel_size, 3)
    pr = _floats("point_range", point_range, 6)
    if min(vs) <= 0:
        raise ValueError(f"voxelize: voxel_size must be positive, got {vs}")
    if any(pr[k + 3] <= pr[k] for k in range(3)):
        raise ValueError(f"voxelize: point_range must be (x_min, y_min, z_min, x_max, y_max, z_max) with max > min, "
                         f"got {pr}")
    grid = _grid_size(vs, pr)
    if min(grid) < 1:
        raise ValueError(f"voxelize: the grid {grid} of point_range {pr} / voxel_size {vs} has an empty axis")
    if grid[0] * grid[1] * grid[2] >= 2**62:
        raise ValueError(f"voxelize: the grid {grid} is too large")
    return vs, pr, grid


def _check_points(points) -> None:
    if not isinstance(points, torch.Tensor):
        raise TypeError(f"voxelize: points must be a tensor, got {type(points).__name__}")
    if points.dim() != 2 or points.shape[1] < 3:
        raise ValueError(f"voxelize: points must be (P, F) with F >= 3 (x, y, z first), got {tuple(points.shape)}")
    if points.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"voxelize: points must be float16, bfloat16, float32 or float64, got {points.dtype}")


def _check_int(name: str, v, lo: int) -> int:
    if isinstance(v, torch.Tensor) and v.numel() == 1 and not v.is_floating_point() and v.dtype != torch.bool:
        v = int(v)
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise TypeError(f"voxelize: {name} must be an int, got {v!r}")
    v = int(v)
    if v < lo:
        raise ValueError(f"voxelize: {name} must be >= {lo}, got {v}")
    return v


def _resolve_impl(impl: str, device: torch.device) -> str:
    return resolve_impl("voxelize", impl, device, IMPLS)


def _assign(points, vs, pr, max_points, max_voxels, impl):
    """coords (M, 3) int32, counts (M,) int64 (uncapped), slots (P,) int64 (voxel*max_points + position or -1),
    for impl "cpu" or "triton"."""
    if impl == "triton":
        from . import triton as triton_impl

        return triton_impl.assign(points, vs, pr, max_points, max_voxels)
    from . import cpu

    return cpu.assign_numba(points, vs, pr, max_points, max_voxels)


def _scatter(points, slots, m, max_points, impl):
    if impl == "triton":
        from . import triton as triton_impl

        return triton_impl.scatter_slots(points, slots, m, max_points)
    from .sort_based import scatter_slots_torch  # plain torch indexing (the autograd path of "cpu" and "reference")

    return scatter_slots_torch(points, slots, m, max_points)


class _ScatterToSlots(torch.autograd.Function):
    """voxels.view(-1, F)[slots[i]] = points[i]; backward gathers the voxel gradient back to the points."""

    @staticmethod
    def forward(ctx, points, slots, m, max_points, impl):
        ctx.save_for_backward(slots)
        return _scatter(points, slots, m, max_points, impl)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        (slots,) = ctx.saved_tensors
        flat = grad.reshape(-1, grad.shape[-1])
        keep = slots >= 0
        out = flat.new_zeros((slots.shape[0], flat.shape[1]))
        out[keep] = flat[slots[keep]]
        return out, None, None, None, None


# ----------------------------------------------------------------------------- public API
def grid_size(voxel_size: Sequence[float], point_range: Sequence[float]) -> tuple[int, int, int]:
    """(nx, ny, nz) = round((max - min) / size) per axis (e.g. (1440, 1440, 40) for BEVFusion's 0.075 m)."""
    return _check_geometry(voxel_size, point_range)[2]


def voxelize(points: torch.Tensor, voxel_size: Sequence[float], point_range: Sequence[float], max_points: int,
             max_voxels: int, impl: str = "auto", return_slots: bool = False):
    """Hard voxelization (official deterministic mode).

    Args:
        points: (P, F) float16 / bfloat16 / float32 / float64, columns (x, y, z, ...) in metres, any
            strides, CPU or CUDA. P = 0 is fine.
        voxel_size: (sx, sy, sz) metres.
        point_range: (x_min, y_min, z_min, x_max, y_max, z_max) metres.
        max_points: points kept per voxel (>= 1); later points of a full voxel are dropped.
        max_voxels: voxels kept (>= 0); voxels first appearing later are dropped.
        impl: "auto" | "reference" | "cpu" | "triton".
        return_slots: also return the (P,) int64 slot of every point (voxel * max_points + position,
            -1 if dropped).
    Returns:
        voxels (M, max_points, F) in the points' dtype, zero-padded; coords (M, 3) int32 cell indices
        (x, y, z); num_points (M,) int32 in [1, max_points]; voxels in first-appearance order.
        Differentiable w.r.t. points (each kept point's gradient is its voxel slot's gradient).
    """
    _check_points(points)
    vs, pr, _ = _check_geometry(voxel_size, point_range)
    max_points = _check_int("max_points", max_points, 1)
    max_voxels = _check_int("max_voxels", max_voxels, 0)
    impl = _resolve_impl(impl, points.device)
    if impl == "reference":
        voxels, coords, num, slots = hard_voxelize_reference(points.detach(), vs, pr, max_points, max_voxels)
        if points.requires_grad and torch.is_grad_enabled():
            voxels = _ScatterToSlots.apply(points, slots, coords.shape[0], max_points, "cpu")
    elif impl == "cpu" and not (points.requires_grad and torch.is_grad_enabled()):
        from . import cpu

        voxels, coords, num, slots = cpu.hard_voxelize_numba(points, vs, pr, max_points, max_voxels)
    else:
        coords, counts, slots = _assign(points, vs, pr, max_points, max_voxels, impl)
        voxels = _ScatterToSlots.apply(points, slots, coords.shape[0], max_points, impl)
        num = counts.clamp(max=max_points).to(torch.int32)
    if return_slots:
        return voxels, coords, num, slots
    return voxels, coords, num


def voxel_mean(voxels: torch.Tensor, num_points: torch.Tensor) -> torch.Tensor:
    """BEVFusion's voxelize_reduce: (M, max_points, F) zero-padded voxels → (M, F) mean of the kept
    points (sum / count; a count of 0 gives zeros)."""
    if voxels.dim() != 3 or num_points.shape != voxels.shape[:1]:
        raise ValueError(f"voxel_mean: voxels must be (M, T, F) and num_points (M,), got {tuple(voxels.shape)} "
                         f"and {tuple(num_points.shape)}")
    return voxels.sum(dim=1) / num_points.clamp(min=1).to(voxels.dtype).view(-1, 1)


def dynamic_voxelize(points: torch.Tensor, voxel_size: Sequence[float], point_range: Sequence[float],
                     impl: str = "auto") -> torch.Tensor:
    """Per-point cells: (P, F) points → (P, 3) int32 (x, y, z), rows of -1 for points outside the grid."""
    _check_points(points)
    vs, pr, _ = _check_geometry(voxel_size, point_range)
    impl = _resolve_impl(impl, points.device)
    if impl == "triton":
        from . import triton as triton_impl

        return triton_impl.point_cells(points.detach(), vs, pr)
    return point_cells(points.detach(), vs, pr)


def voxelize_mean(points: torch.Tensor, voxel_size: Sequence[float], point_range: Sequence[float],
                  impl: str = "auto"):
    """Dynamic (DynamicScatter-style) voxelization: the mean of *all* points of each occupied cell.

    Returns feats (M, F) in the points' dtype (fp32 sums, fp64 for fp64), coords (M, 3) int32 (x, y, z)
    and num_points (M,) int32, voxels in first-appearance order (the same order `voxelize` uses).
    Differentiable w.r.t. points (except impl="reference").
    """
    _check_points(points)
    vs, pr, _ = _check_geometry(voxel_size, point_range)
    impl = _resolve_impl(impl, points.device)
    if impl == "reference":
        return voxelize_mean_reference(points.detach(), vs, pr)
    p = points.shape[0]
    cap = max(p, 1)
    coords, counts, slots = _assign(points.detach(), vs, pr, cap, p, impl)
    keep = slots >= 0
    vid = torch.div(slots[keep], cap, rounding_mode="floor")
    acc = torch.float64 if points.dtype == torch.float64 else torch.float32
    sums = torch.zeros((coords.shape[0], points.shape[1]), dtype=acc, device=points.device)
    sums = sums.index_add(0, vid, points[keep].to(acc))
    feats = (sums / counts.clamp(min=1).to(acc).view(-1, 1)).to(points.dtype)
    return feats, coords, counts.to(torch.int32)


class Voxelization(nn.Module):
    """The official hard `Voxelization` layer (no parameters or buffers, so no state_dict keys).

    Args (official config names): voxel_size (3,), point_cloud_range (6,), max_num_points (per voxel;
    <= 0 means dynamic: forward returns only the per-point cells), max_voxels (an int, or
    (train, test) as in the configs: [120000, 160000]), deterministic (only True is implemented).
    forward(points (P, F)) → (voxels, coords (x, y, z), num_points) as `voxelize`.
    """

    def __init__(self, voxel_size, point_cloud_range, max_num_points: int,
                 max_voxels: Union[int, Sequence[int]] = 20000, deterministic: bool = True, impl: str = "auto"):
        super().__init__()
        if not deterministic:
            raise ValueError("Voxelization: only deterministic=True is implemented (it is the official default)")
        self.voxel_size, self.point_cloud_range, _ = _check_geometry(voxel_size, point_cloud_range)
        self.max_num_points = int(max_num_points)
        mv = (max_voxels, max_voxels) if isinstance(max_voxels, int) else tuple(int(v) for v in max_voxels)
        if len(mv) != 2:
            raise ValueError(f"Voxelization: max_voxels must be an int or (train, test), got {max_voxels!r}")
        self.max_voxels = mv
        if impl not in IMPLS:
            raise ValueError(f"Voxelization: impl must be one of {IMPLS}, got {impl!r}")
        self.impl = impl

    def forward(self, points: torch.Tensor):
        if self.max_num_points <= 0:
            return dynamic_voxelize(points, self.voxel_size, self.point_cloud_range, impl=self.impl)
        max_voxels = self.max_voxels[0] if self.training else self.max_voxels[1]
        return voxelize(points, self.voxel_size, self.point_cloud_range, self.max_num_points, max_voxels,
                        impl=self.impl)

    def extra_repr(self) -> str:
        return (f"voxel_size={self.voxel_size}, point_cloud_range={self.point_cloud_range}, "
                f"max_num_points={self.max_num_points}, max_voxels={self.max_voxels}")


class DynamicScatter(nn.Module):
    """Dynamic voxelization with mean reduction (the official `DynamicScatter` type; mmcv's op with
    average_points=True): every point inside the grid counts, and each occupied voxel gets the mean of its
    points' features. BEVFusion builds it instead of `Voxelization` when `max_num_points` is <= 0 or
    absent; no parameters or buffers, so no state_dict keys.

    Args (official config names): voxel_size (3,), point_cloud_range (6,), average_points (only True,
    the mean, is implemented), max_num_points (when given, must be <= 0: the official rule that picks
    this module), max_voxels (accepted so that a hard-voxelization config with max_num_points <= 0
    builds; not used: dynamic voxelization keeps every occupied voxel, as mmcv's does), deterministic
    (only True), impl ("auto" | "reference" | "cpu" | "triton", as `voxelize_mean`).
    forward(points (P, F)) → (feats (M, F) in the points' dtype (fp32 sums, fp64 for fp64), coords (M, 3)
    int32 cell indices (x, y, z), as `Voxelization`), voxels in first-appearance order. There is no
    count: the features are means already. Differentiable w.r.t. points (except impl="reference").
    """

    def __init__(self, voxel_size, point_cloud_range, average_points: bool = True, max_num_points: int = -1,
                 max_voxels: Union[int, Sequence[int], None] = None, deterministic: bool = True, impl: str = "auto"):
        super().__init__()
        if not average_points:
            raise ValueError("DynamicScatter: only average_points=True (the mean per voxel) is implemented")
        if int(max_num_points) > 0:
            raise ValueError(f"DynamicScatter: max_num_points={max_num_points} asks for hard voxels; use "
                             "Voxelization (BEVFusion picks DynamicScatter only for max_num_points <= 0)")
        if not deterministic:
            raise ValueError("DynamicScatter: only deterministic=True is implemented")
        if impl not in IMPLS:
            raise ValueError(f"DynamicScatter: impl must be one of {IMPLS}, got {impl!r}")
        self.voxel_size, self.point_cloud_range, _ = _check_geometry(voxel_size, point_cloud_range)
        self.impl = impl

    def forward(self, points: torch.Tensor):
        feats, coords, _ = voxelize_mean(points, self.voxel_size, self.point_cloud_range, impl=self.impl)
        return feats, coords

    def extra_repr(self) -> str:
        return f"voxel_size={self.voxel_size}, point_cloud_range={self.point_cloud_range}, average_points=True"
