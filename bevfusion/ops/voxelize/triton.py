"""Triton voxelization (CUDA tensors; CPU tensors under TRITON_INTERPRET=1 for the tests).

Two kernels around the sort-based assignment of `sort_based.assign_sorted`:

* `_cells_kernel`: per point, the cell (x, y, z) (rows of -1 outside) and the int64 sort key
  (x*ny + y)*nz + z (grid volume outside). Division is `div_rn` (IEEE round-to-nearest, as torch and
  numpy on the CPU and the official kernel's default nvcc float division), so a boundary point lands
  in the same cell on every path; Triton's plain `/` is an approximate division on GPUs.
* `_scatter_kernel`: copies each kept point's features into its voxel slot.

The stable sort, segment starts and the ranking of voxels by their first point stay in torch (one
host sync: the voxel count, which fixes the output shape). Everything is deterministic: the sort is
stable and every write goes to a distinct slot.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .reference import SUPPORTED_DTYPES, compute_dtype, grid_size
from .sort_based import assign_sorted

BLOCK = 256


@triton.jit
def _div(a, b, F64: tl.constexpr):
    # float64 division is IEEE (div.rn.f64) already; float32 `/` is approximate on GPUs, div_rn is not
    if F64:
        return a / b
    else:
        return tl.math.div_rn(a, b)


@triton.jit
def _cells_kernel(p_ptr, stride_p, stride_f, cells_ptr, keys_ptr, P, prm_ptr, nx, ny, nz, outside_key,
                  F64: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    live = i < P
    row = p_ptr + i * stride_p
    ct = tl.float64 if F64 else tl.float32
    x = tl.load(row, mask=live, other=0).to(ct)
    y = tl.load(row + stride_f, mask=live, other=0).to(ct)
    z = tl.load(row + 2 * stride_f, mask=live, other=0).to(ct)
    # prm = (min x, min y, min z, size x, size y, size z) in the compute dtype
    cx = tl.floor(_div(x - tl.load(prm_ptr), tl.load(prm_ptr + 3), F64))
    cy = tl.floor(_div(y - tl.load(prm_ptr + 1), tl.load(prm_ptr + 4), F64))
    cz = tl.floor(_div(z - tl.load(prm_ptr + 2), tl.load(prm_ptr + 5), F64))
    inside = (cx >= 0) & (cx < nx) & (cy >= 0) & (cy < ny) & (cz >= 0) & (cz < nz)  # NaN: False
    ix = tl.where(inside, cx, -1.0).to(tl.int32)
    iy = tl.where(inside, cy, -1.0).to(tl.int32)
    iz = tl.where(inside, cz, -1.0).to(tl.int32)
    key = (ix.to(tl.int64) * ny + iy) * nz + iz
    key = tl.where(inside, key, outside_key)  # the grid volume, from the host (no `.to` on an argument)
    tl.store(cells_ptr + i * 3, ix, mask=live)
    tl.store(cells_ptr + i * 3 + 1, iy, mask=live)
    tl.store(cells_ptr + i * 3 + 2, iz, mask=live)
    tl.store(keys_ptr + i, key, mask=live)


@triton.jit
def _scatter_kernel(p_ptr, stride_p, stride_f, slots_ptr, out_ptr, P, F,
                    BLOCK: tl.constexpr, BLOCK_F: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    f = tl.arange(0, BLOCK_F)
    slot = tl.load(slots_ptr + i, mask=i < P, other=-1)
    m = (slot >= 0)[:, None] & (f < F)[None, :]
    v = tl.load(p_ptr + i.to(tl.int64)[:, None] * stride_p + f[None, :] * stride_f, mask=m, other=0)
    tl.store(out_ptr + slot[:, None] * F + f[None, :], v, mask=m)


# Kernel keyword arguments, read by the launchers and by `aot_variants`.
SCATTER_BLOCK = 64


def _cells_meta(dtype: torch.dtype) -> dict:
    return dict(F64=dtype == torch.float64, BLOCK=BLOCK)


def _scatter_meta(f: int) -> dict:
    return dict(BLOCK=SCATTER_BLOCK, BLOCK_F=triton.next_power_of_2(f))


def aot_variants() -> list:
    """Every launch the launchers below can make on a GPU, for `bevfusion.ops.triton_aot`: per points
    dtype, `_cells_kernel` for contiguous points (column stride 1, which the JIT makes a constant)
    and for any strides, and `_scatter_kernel` for point widths reaching every BLOCK_F up to 16."""
    from ..triton_aot import I32, I64, launch, ptr

    out = []
    for dtype in SUPPORTED_DTYPES:
        f, prm = ptr(dtype), ptr(compute_dtype(dtype))
        ieee = () if dtype == torch.float64 else ("div.rn.f32",)  # see _div: same cells as the CPU
        for layout, stride_f in (("contiguous", 1), ("strided", "i32")):
            out.append(launch("voxelize", _cells_kernel, f"{f[1:]} {layout}", hot=True, meta=_cells_meta(dtype),
                              args=dict(p_ptr=f, stride_p="i32", stride_f=stride_f, cells_ptr=I32, keys_ptr=I64,
                                        P="i32", prm_ptr=prm, nx="i32", ny="i32", nz="i32", outside_key="i32"),
                              require_ptx=ieee, forbid_ptx=("div.full",) if ieee else ()))
        for width in sorted({triton.next_power_of_2(w) for w in range(1, 17)}):
            out.append(launch("voxelize", _scatter_kernel, f"{f[1:]} F={width}", hot=True, meta=_scatter_meta(width),
                              args=dict(p_ptr=f, stride_p="i32", stride_f=1, slots_ptr=I64, out_ptr=f, P="i32",
                                        F=width)))
    return out


def cells_and_keys(points: torch.Tensor, voxel_size, point_range):
    nx, ny, nz = grid_size(voxel_size, point_range)
    p = points.shape[0]
    cells = torch.empty((p, 3), dtype=torch.int32, device=points.device)
    keys = torch.empty(p, dtype=torch.int64, device=points.device)
    if p:
        prm = torch.tensor([float(v) for v in point_range[:3]] + [float(v) for v in voxel_size],
                           dtype=compute_dtype(points.dtype), device=points.device)
        meta = _cells_meta(points.dtype)
        _cells_kernel[(triton.cdiv(p, meta["BLOCK"]),)](
            points, points.stride(0), points.stride(1), cells, keys, p, prm, nx, ny, nz, nx * ny * nz, **meta)
    return cells, keys


def point_cells(points: torch.Tensor, voxel_size, point_range) -> torch.Tensor:
    return cells_and_keys(points, voxel_size, point_range)[0]


def assign(points, voxel_size, point_range, max_points, max_voxels):
    return assign_sorted(points, voxel_size, point_range, max_points, max_voxels, cells_and_keys=cells_and_keys)


def scatter_slots(points: torch.Tensor, slots: torch.Tensor, m: int, max_points: int) -> torch.Tensor:
    p, f = points.shape
    out = torch.zeros((m * max_points, f), dtype=points.dtype, device=points.device)
    if p and m:
        meta = _scatter_meta(f)
        _scatter_kernel[(triton.cdiv(p, meta["BLOCK"]),)](points, points.stride(0), points.stride(1), slots, out,
                                                          p, f, **meta)
    return out.view(m, max_points, f)


def hard_voxelize(points, voxel_size, point_range, max_points, max_voxels):
    coords, counts, slots = assign(points, voxel_size, point_range, max_points, max_voxels)
    voxels = scatter_slots(points.detach(), slots, coords.shape[0], max_points)
    return voxels, coords, counts.clamp(max=max_points).to(torch.int32), slots
