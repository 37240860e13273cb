"""BEV pooling: sum the features of points that share a BEV cell (BEVFusion's camera-to-BEV step).

Two steps:

* `bev_pool_plan(coords, batch_size, grid)` masks, ranks and sorts the points once (a
  `BevPoolPlan`); it depends on the coordinates only, so a fixed rig and augmentation (inference)
  reuses it and the reduction does no sort at all.
* `bev_pool_with_plan(feats, plan)` (or `bev_pool(feats, plan=plan)`) reduces each cell's interval,
  one cell per program / loop iteration, without atomics. Differentiable w.r.t. `feats`.

`bev_pool(feats, coords, batch_size, grid)` does both. `lift_bev_pool(depth, feats, ...)` fuses
the depth x feature outer product of the LSS lift into the pooling, so the (BN, D, fH, fW, C)
frustum tensor is never materialised. `points_to_bev_coords` turns metric frustum points into cell
coordinates with the official truncation quirk.

Implementations (`impl`, the ops' backends: `bevfusion.ops._dispatch`): "reference" (plain torch,
float64 accumulation: the test oracle), "cpu" (numba, CPU tensors), "triton" (CUDA tensors; CPU tensors
under TRITON_INTERPRET=1, for tests) and "auto" (triton for CUDA tensors, cpu otherwise). The plan is
built by numba for "cpu" (`cpu.plan_arrays`) and by torch ops otherwise (`plan.plan_tensors`: the GPU
path and the reference; both give the same plan). Importing this package needs torch only; numba and
triton are imported when their path is first used.

Output layout: the result has the logical shape (B, C, D, H, W) but is a channels-last view
(memory order B, D, H, W, C, i.e. `torch.channels_last_3d`), as the kernels write whole channel rows;
this skips the official `permute(...).contiguous()` copy. Call `.contiguous()` if you need NCDHW memory.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from bevfusion.ops._dispatch import resolve_impl

from .plan import SUPPORTED_DTYPES, BevPoolPlan, _check_grid, check_coords, make_plan, plan_tensors
from .reference import bev_pool_reference, lift_reference, pool_cells_reference

__all__ = [
    "BevPoolPlan", "bev_pool_plan", "bev_pool", "bev_pool_with_plan", "lift_bev_pool", "points_to_bev_coords",
    "grid_from_bounds", "bev_pool_reference", "IMPLS",
]

IMPLS = ("auto", "reference", "cpu", "triton")


# ----------------------------------------------------------------------------- checks and dispatch
def _check_float(name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"bev_pool: {name} must be a tensor, got {type(t).__name__}")
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"bev_pool: {name} must be float16, bfloat16, float32 or float64, got {t.dtype}")


def _resolve_impl(impl: str, device: torch.device) -> str:
    return resolve_impl("bev_pool", impl, device, IMPLS)

def _check_plan(plan, device: torch.device) -> None:
    if not isinstance(plan, BevPoolPlan):
        raise TypeError(f"bev_pool: plan must be a BevPoolPlan, got {type(plan).__name__}")
    if plan.device != device:
        raise ValueError(f"bev_pool: plan is on {plan.device} but the features are on {device}; use plan.to(device)")


def _kernels(impl: str):
    """The module of the "cpu" or "triton" path (imported on first use: numba / triton come with it)."""
    if impl == "triton":
        from . import triton as kernels
    else:
        from . import cpu as kernels
    return kernels


def _pool_forward(feats: torch.Tensor, plan: BevPoolPlan, impl: str) -> torch.Tensor:
    return _kernels(impl).pool_forward(feats, plan)


def _pool_backward(grad: torch.Tensor, plan: BevPoolPlan, impl: str) -> torch.Tensor:
    return _kernels(impl).pool_backward(grad, plan)


class _BevPoolFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, feats, plan, impl):
        ctx.plan, ctx.impl = plan, impl
        return _pool_forward(feats, plan, impl)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        return _pool_backward(grad.contiguous(), ctx.plan, ctx.impl), None, None


def _lift_forward(depth, feats, plan, impl):
    return _kernels(impl).lift_forward(depth, feats, plan)


def _lift_backward(grad, depth, feats, plan, impl, need_depth, need_feats):
    if impl == "triton":
        return _kernels(impl).lift_backward(grad, depth, feats, plan, need_depth, need_feats)
    return _kernels(impl).lift_backward(grad, depth, feats, plan)


class _LiftBevPoolFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, depth, feats, plan, impl):
        ctx.plan, ctx.impl = plan, impl
        ctx.save_for_backward(depth, feats)
        return _lift_forward(depth, feats, plan, impl)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        depth, feats = ctx.saved_tensors
        gd, gf = _lift_backward(grad.contiguous(), depth, feats, ctx.plan, ctx.impl, ctx.needs_input_grad[0],
                                ctx.needs_input_grad[1])
        return (gd if ctx.needs_input_grad[0] else None), (gf if ctx.needs_input_grad[1] else None), None, None


def _to_output(cells: torch.Tensor, plan: BevPoolPlan) -> torch.Tensor:
    d, h, w = plan.grid
    return cells.view(plan.batch_size, d, h, w, cells.shape[1]).permute(0, 4, 1, 2, 3)


def _plan_from_args(coords, batch_size, grid, plan, device, drop_outside=True, impl="auto"):
    if plan is not None:
        if coords is not None:
            raise ValueError("bev_pool: pass either coords (with batch_size and grid) or plan, not both")
        if batch_size is not None and batch_size != plan.batch_size:
            raise ValueError(f"bev_pool: batch_size {batch_size} disagrees with the plan's {plan.batch_size}")
        if grid is not None and tuple(int(g) for g in grid) != tuple(plan.grid):
            raise ValueError(f"bev_pool: grid {tuple(grid)} disagrees with the plan's {plan.grid}")
        _check_plan(plan, device)
        return plan
    if coords is None or batch_size is None or grid is None:
        raise ValueError("bev_pool: give coords, batch_size and grid, or a plan")
    check_coords(coords)
    if coords.device != device:
        raise ValueError(f"bev_pool: coords are on {coords.device} but the features are on {device}")
    return bev_pool_plan(coords, batch_size, grid, drop_outside=drop_outside, impl=impl)


# ----------------------------------------------------------------------------- public API
def bev_pool_plan(coords: torch.Tensor, batch_size: int, grid: Sequence[int], *, drop_outside: bool = True,
                  impl: str = "auto") -> BevPoolPlan:
    """Mask, rank and sort the points once; the result drives `bev_pool_with_plan`.

    Args:
        coords: (N, 4) int (int8/16/32/64), columns (x, y, z, batch) in cell units, on CPU or CUDA.
            Non-contiguous tensors are fine.
        batch_size: B; points whose batch index is outside [0, B) are treated as outside the grid.
        grid: (D, H, W) = (Z cells, X cells, Y cells) of the output.
        drop_outside: True (default): points outside the grid are dropped, as the official
            view transform does. False: the caller promises every point is inside; the promise is
            checked and a ValueError names the first offending point if it is broken.
        impl: "auto" | "reference" | "cpu" | "triton": "cpu" builds it with numba (one counting pass and
            one scatter pass: a stable O(N) bucket sort over the cells), the others with torch ops.
    Returns:
        BevPoolPlan on the device of `coords`. An empty input gives a plan with K = M = 0.
    """
    check_coords(coords)
    grid = _check_grid(batch_size, grid)
    if resolve_impl("bev_pool_plan", impl, coords.device, IMPLS) == "cpu":
        from .cpu import plan_arrays

        tensors = plan_arrays(coords, batch_size, grid)
    else:
        tensors = plan_tensors(coords, batch_size, grid)
    return make_plan(coords, batch_size, grid, tensors, drop_outside)


def bev_pool(feats: torch.Tensor, coords: Optional[torch.Tensor] = None, batch_size: Optional[int] = None,
             grid: Optional[Sequence[int]] = None, impl: str = "auto", *,
             plan: Optional[BevPoolPlan] = None, drop_outside: bool = True) -> torch.Tensor:
    """Sum the features of points that share a BEV cell.

    Args:
        feats: (N, C) float16 / bfloat16 / float32 / float64; any strides.
        coords: (N, 4) int, columns (x, y, z, batch) in cell units. Points outside the grid (or with
            a batch index outside [0, B)) are dropped, as the official view transform drops them.
        batch_size: B.
        grid: (D, H, W) = (Z cells, X cells, Y cells).
        impl: "auto" | "reference" | "cpu" | "triton".
        plan: a `BevPoolPlan` from `bev_pool_plan`, instead of coords (batch_size and grid may then be
            omitted; if given they must match the plan).
        drop_outside: False promises that every point is inside the grid; the promise is checked
            (ValueError naming the first offending point), never trusted blindly.
    Returns:
        (B, C, D, H, W) in the dtype of `feats` (accumulated in fp32, fp64 for fp64), with
        out[b, :, z, x, y] = sum of the rows of `feats` whose coords are (x, y, z, b); zero for empty
        cells and for N = 0. Channels-last memory (see the module docstring). Differentiable w.r.t.
        `feats`.
    """
    _check_float("feats", feats)
    impl = _resolve_impl(impl, feats.device)
    if impl == "reference" and plan is None and coords is not None and drop_outside:
        _check_shapes(feats, coords)
        return bev_pool_reference(feats, coords, batch_size, _check_grid(batch_size, grid))
    plan = _plan_from_args(coords, batch_size, grid, plan, feats.device, drop_outside, impl)
    return bev_pool_with_plan(feats, plan, impl)


def _check_shapes(feats, coords):
    check_coords(coords)
    if feats.dim() != 2 or feats.shape[0] != coords.shape[0]:
        raise ValueError(f"bev_pool: feats must be (N, C) with N = len(coords) = {coords.shape[0]}, "
                         f"got {tuple(feats.shape)}")
    if coords.device != feats.device:
        raise ValueError(f"bev_pool: coords are on {coords.device} but the features are on {feats.device}")


def bev_pool_with_plan(feats: torch.Tensor, plan: BevPoolPlan, impl: str = "auto") -> torch.Tensor:
    """The reduction alone: `bev_pool(feats, plan=plan)`. See `bev_pool` for shapes and dtypes."""
    _check_float("feats", feats)
    _check_plan(plan, feats.device)
    if feats.dim() != 2 or feats.shape[0] != plan.num_points:
        raise ValueError(f"bev_pool: feats must be (N, C) with N = plan.num_points = {plan.num_points}, "
                         f"got {tuple(feats.shape)}")
    impl = _resolve_impl(impl, feats.device)
    if impl == "reference":
        return _to_output(pool_cells_reference(feats, plan.point_cells, plan.num_cells), plan)
    return _to_output(_BevPoolFunction.apply(feats.contiguous(), plan, impl), plan)


def lift_bev_pool(depth: torch.Tensor, feats: torch.Tensor, coords: Optional[torch.Tensor] = None,
                  batch_size: Optional[int] = None, grid: Optional[Sequence[int]] = None, impl: str = "auto", *,
                  plan: Optional[BevPoolPlan] = None, drop_outside: bool = True) -> torch.Tensor:
    """Fused LSS lift + BEV pooling: `bev_pool(depth[:, :, :, :, None] * feats[:, None], ...)` without
    materialising the (BN, D, fH, fW, C) frustum features.

    Args:
        depth: (BN, D, fH, fW) float, depth probabilities per camera (BN = batch x cameras).
        feats: (BN, fH, fW, C) float, image features channels-last (from the usual (BN, C, fH, fW),
            `x.permute(0, 2, 3, 1)`; any strides, a copy is made if needed). Same dtype as `depth`.
        coords / batch_size / grid / plan / drop_outside: as in `bev_pool`, over the BN * D * fH * fW
            frustum points in (BN, D, fH, fW) order (the order of `geom.flatten(0, -2)` for the
            (B, N, D, fH, fW, 3) geometry).
        impl: "auto" | "reference" | "cpu" | "triton".
    Returns:
        (B, C, D_out, H, W) in feats' dtype (fp32 accumulation), channels-last memory. Differentiable
        w.r.t. both `depth` and `feats`.
    """
    _check_float("depth", depth)
    _check_float("feats", feats)
    if depth.dtype != feats.dtype:
        raise TypeError(f"lift_bev_pool: depth ({depth.dtype}) and feats ({feats.dtype}) must share a dtype")
    if depth.dim() != 4 or feats.dim() != 4 or depth.shape[0] != feats.shape[0] or \
            depth.shape[2:] != feats.shape[1:3]:
        raise ValueError(f"lift_bev_pool: expected depth (BN, D, fH, fW) and feats (BN, fH, fW, C), got "
                         f"{tuple(depth.shape)} and {tuple(feats.shape)}")
    if depth.device != feats.device:
        raise ValueError(f"lift_bev_pool: depth on {depth.device}, feats on {feats.device}")
    n_points = depth.numel()
    if plan is None and coords is not None and (coords.dim() != 2 or coords.shape[0] != n_points):
        raise ValueError(f"lift_bev_pool: coords must be (BN*D*fH*fW, 4) = ({n_points}, 4), got {tuple(coords.shape)}")
    impl_r = _resolve_impl(impl, depth.device)
    if impl_r == "reference" and plan is None and coords is not None and drop_outside:
        check_coords(coords)
        if coords.device != depth.device:
            raise ValueError(f"lift_bev_pool: coords on {coords.device}, depth on {depth.device}")
        return bev_pool_reference(lift_reference(depth, feats), coords, batch_size, _check_grid(batch_size, grid))
    plan = _plan_from_args(coords, batch_size, grid, plan, depth.device, drop_outside, impl_r)
    if plan.num_points != n_points:
        raise ValueError(f"lift_bev_pool: the plan covers {plan.num_points} points, depth has {n_points}")
    if impl_r == "reference":
        return _to_output(pool_cells_reference(lift_reference(depth, feats), plan.point_cells, plan.num_cells), plan)
    out = _LiftBevPoolFunction.apply(depth.contiguous(), feats.contiguous(), plan, impl_r)
    return _to_output(out, plan)


# ----------------------------------------------------------------------------- geometry helpers
def grid_from_bounds(xbound: Sequence[float], ybound: Sequence[float], zbound: Sequence[float]):
    """Cell size, lower bound and cell count per axis from official (lower, upper, step) bounds.

    Reproduces the official `gen_dx_bx` in float32: dx = step, bx = lower + step / 2 (the first cell's
    centre), lower = bx - dx / 2 computed in float32, n = int((upper - lower) / step) in Python floats.

    Returns:
        (dx (3,) float32, bx_lower (3,) float32, nx (3,) tuple of int), axis order (x, y, z). The
        `bev_pool` grid is (nx[2], nx[0], nx[1]).
    """
    rows = (xbound, ybound, zbound)
    dx = torch.tensor([r[2] for r in rows], dtype=torch.float32)
    bx = torch.tensor([r[0] + r[2] / 2.0 for r in rows], dtype=torch.float32)
    nx = tuple(int((r[1] - r[0]) / r[2]) for r in rows)
    return dx, bx - dx / 2.0, nx


def points_to_bev_coords(geom: torch.Tensor, dx, bx_lower, nx=None) -> torch.Tensor:
    """Cell coordinates (x, y, z, batch) of frustum points, with the official truncation quirk.

    cell = trunc((p - bx_lower) / dx) per axis, truncating toward zero as the official `.long()`
    does, so points less than one cell *below* the lower bound land in cell 0 instead of being
    dropped. Non-finite points get cell -1 (dropped by the plan). Nothing is masked here: the plan
    step drops cells outside [0, nx).

    Args:
        geom: (B, ..., 3) float, metric points in the (augmented) LiDAR frame, e.g. the view
            transform's (B, N, D, fH, fW, 3) geometry.
        dx: (3,) cell size per axis (x, y, z), metres.
        bx_lower: (3,) lower bound per axis, metres (see `grid_from_bounds`).
        nx: optional (3,) cell counts; only used to clamp far-away points before the integer cast.
    Returns:
        (B * prod(...), 4) int64, columns (x, y, z, batch), rows in geom's flattened order.
    """
    if not isinstance(geom, torch.Tensor) or not geom.is_floating_point() or geom.dim() < 2 or geom.shape[-1] != 3:
        raise ValueError(f"points_to_bev_coords: geom must be a float (B, ..., 3) tensor, got "
                         f"{getattr(geom, 'shape', type(geom))}")
    b = geom.shape[0]
    dx = torch.as_tensor(dx, dtype=geom.dtype, device=geom.device)
    lower = torch.as_tensor(bx_lower, dtype=geom.dtype, device=geom.device)
    pts = geom.reshape(-1, 3)
    v = (pts - lower) / dx
    hi = float(max(nx)) + 1.0 if nx is not None else 2.0**40
    # Clamp before the cast (out-of-range float -> int is undefined); -1 and hi stay outside the grid,
    # while (-1, 0) still truncates to cell 0 like the official code.
    v = torch.nan_to_num(v, nan=-1.0, posinf=hi, neginf=-1.0).clamp(-1.0, hi)
    cells = v.long()
    batch = torch.arange(b, device=geom.device).repeat_interleave(pts.shape[0] // b if b else 0)
    return torch.cat([cells, batch.unsqueeze(1)], 1)
