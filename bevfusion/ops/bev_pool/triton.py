"""Triton kernels for BEV pooling and the fused lift + pool.

Forward: one program per output cell (and channel block), taken from the plan's `launch_cells`
(non-empty cells longest first, then the empty ones). The program gathers its points through the
sorted `order` (so the features are never permuted in memory), sums a [BLOCK_P, BLOCK_C] tile per
step in fp32 (fp64 for fp64 inputs) and writes its output row once: no atomics and no memset, since
the empty cells' programs write the zeros.

Backward of `bev_pool` is a pure gather, one program per block of points. The fused op's backward
needs no atomics either: grad_depth is a per-point dot product, and grad_feats of pixel (n, v, u) sums
over its D depth bins, which one program owns.

This module imports triton at import time; `bevfusion.ops.bev_pool` imports it only when the Triton
path is used. Off-GPU it runs under TRITON_INTERPRET=1 (tests only).
"""
from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl

from .plan import SUPPORTED_DTYPES, BevPoolPlan


@triton.jit
def _pool_fwd_kernel(feats_ptr, order_ptr, cell_ptr_ptr, launch_ptr, out_ptr, C,
                     BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, IS_F64: tl.constexpr):
    cell = tl.load(launch_ptr + tl.program_id(0)).to(tl.int64)
    ch = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = ch < C
    start = tl.load(cell_ptr_ptr + cell)
    end = tl.load(cell_ptr_ptr + cell + 1)
    if IS_F64:
        acc = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float64)
    else:
        acc = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
    for j0 in range(start, end, BLOCK_P):
        j = j0 + tl.arange(0, BLOCK_P)
        jmask = j < end
        rows = tl.load(order_ptr + j, mask=jmask, other=0).to(tl.int64)
        x = tl.load(feats_ptr + rows[:, None] * C + ch[None, :], mask=jmask[:, None] & cmask[None, :], other=0.0)
        acc += x.to(acc.dtype)
    tl.store(out_ptr + cell * C + ch, tl.sum(acc, axis=0).to(out_ptr.dtype.element_ty), mask=cmask)


@triton.jit
def _pool_bwd_kernel(grad_ptr, cells_ptr, gfeats_ptr, N, C, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    p = tl.program_id(0).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    pmask = p < N
    ch = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = ch < C
    cell = tl.load(cells_ptr + p, mask=pmask, other=-1)
    valid = cell >= 0
    g = tl.load(grad_ptr + cell[:, None] * C + ch[None, :], mask=valid[:, None] & cmask[None, :], other=0.0)
    tl.store(gfeats_ptr + p[:, None] * C + ch[None, :], g, mask=pmask[:, None] & cmask[None, :])


@triton.jit
def _lift_fwd_kernel(depth_ptr, feats_ptr, order_ptr, cell_ptr_ptr, launch_ptr, out_ptr, C, DP, P,
                     BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, IS_F64: tl.constexpr):
    cell = tl.load(launch_ptr + tl.program_id(0)).to(tl.int64)
    ch = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = ch < C
    start = tl.load(cell_ptr_ptr + cell)
    end = tl.load(cell_ptr_ptr + cell + 1)
    if IS_F64:
        acc = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float64)
    else:
        acc = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
    for j0 in range(start, end, BLOCK_P):
        j = j0 + tl.arange(0, BLOCK_P)
        jmask = j < end
        i = tl.load(order_ptr + j, mask=jmask, other=0).to(tl.int64)
        w = tl.load(depth_ptr + i, mask=jmask, other=0.0).to(acc.dtype)
        rows = (i // DP) * P + i % P  # frustum point (n, d, pixel) -> feature row (n, pixel)
        x = tl.load(feats_ptr + rows[:, None] * C + ch[None, :], mask=jmask[:, None] & cmask[None, :], other=0.0)
        acc += w[:, None] * x.to(acc.dtype)
    tl.store(out_ptr + cell * C + ch, tl.sum(acc, axis=0).to(out_ptr.dtype.element_ty), mask=cmask)


@triton.jit
def _lift_bwd_depth_kernel(grad_ptr, feats_ptr, cells_ptr, gdepth_ptr, N, C, DP, P,
                           BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, IS_F64: tl.constexpr):
    i = tl.program_id(0).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    imask = i < N
    cell = tl.load(cells_ptr + i, mask=imask, other=-1)
    valid = cell >= 0
    rows = (i // DP) * P + i % P
    if IS_F64:
        acc = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float64)
    else:
        acc = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        ch = c0 + tl.arange(0, BLOCK_C)
        m = valid[:, None] & (ch < C)[None, :]
        g = tl.load(grad_ptr + cell[:, None] * C + ch[None, :], mask=m, other=0.0)
        f = tl.load(feats_ptr + rows[:, None] * C + ch[None, :], mask=m, other=0.0)
        acc += g.to(acc.dtype) * f.to(acc.dtype)
    tl.store(gdepth_ptr + i, tl.sum(acc, axis=1).to(gdepth_ptr.dtype.element_ty), mask=imask)


@triton.jit
def _lift_bwd_feats_kernel(grad_ptr, depth_ptr, cells_ptr, gfeats_ptr, NPIX, C, D, P,
                           BLOCK_Q: tl.constexpr, BLOCK_C: tl.constexpr, IS_F64: tl.constexpr):
    q = tl.program_id(0).to(tl.int64) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    qmask = q < NPIX
    ch = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = ch < C
    cam = q // P
    base = cam * D * P + (q - cam * P)  # frustum index of (cam, d = 0, pixel)
    if IS_F64:
        acc = tl.zeros([BLOCK_Q, BLOCK_C], dtype=tl.float64)
    else:
        acc = tl.zeros([BLOCK_Q, BLOCK_C], dtype=tl.float32)
    for d in range(0, D):
        i = base + d * P
        cell = tl.load(cells_ptr + i, mask=qmask, other=-1)
        valid = cell >= 0
        w = tl.load(depth_ptr + i, mask=valid, other=0.0).to(acc.dtype)
        g = tl.load(grad_ptr + cell[:, None] * C + ch[None, :], mask=valid[:, None] & cmask[None, :], other=0.0)
        acc += w[:, None] * g.to(acc.dtype)
    tl.store(gfeats_ptr + q[:, None] * C + ch[None, :], acc.to(gfeats_ptr.dtype.element_ty),
             mask=qmask[:, None] & cmask[None, :])


# ----------------------------------------------------------------------------- launch parameters
def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _block_c(c: int) -> int:
    # One channel block covers BEVFusion's 80 channels (128 lanes, 80 used, as the T2 prototype);
    # wider features are split over a second grid axis.
    return min(triton.next_power_of_2(max(c, 1)), 128)


# Points (rows) per program of the backward kernels: GPU value, interpreter value.
BWD_BLOCK_P = (32, 16)
LIFT_BWD_DEPTH_BLOCK_P = (16, 16)  # 32 needed 160 registers per thread (ptxas -v, sm_90a)
LIFT_BWD_FEATS_BLOCK_Q = (16, 8)
BWD_NUM_WARPS = 4


def _pick(pair, interpret: bool | None = None) -> int:
    return pair[1] if (_interpreting() if interpret is None else interpret) else pair[0]


# The launch parameters (constexprs and num_warps) of each kernel, read by its launcher and by
# `aot_variants` (the ahead-of-time compile test): one table for both. interpret=None: from the
# environment (TRITON_INTERPRET); True / False: the interpreter's / the GPU's values.
# Points per step of the forward kernels on a GPU, (fp32/fp64, fp16/bf16). `_pool_fwd_kernel` was swept
# on an H200 (benchmarks/tune_bev_pool.py, 2026-12-04; 1.99M x 80 -> 360 x 360, cached plan; 25 configs of
# BLOCK_P x num_warps x BLOCK_C): 2 points on one warp per 128-channel row was fastest in both dtypes
# (fp32 0.214 ms vs 0.238 ms for 4 points; fp16 0.152 vs 0.155 for 8; more warps or 64-channel blocks
# were slower). `_lift_fwd_kernel` was not swept and keeps its untuned defaults.
POOL_FWD_BLOCK_P = (2, 2)
LIFT_FWD_BLOCK_P = (4, 8)


def _fwd_meta(c: int, dtype: torch.dtype, interpret: bool | None = None, kernel: str = "pool") -> dict:
    """`_pool_fwd_kernel` (kernel="pool") and `_lift_fwd_kernel` (kernel="lift"): one warp per
    128-channel row; the interpreter takes 4 points per step."""
    meta = dict(BLOCK_C=_block_c(c), IS_F64=dtype == torch.float64, num_warps=1)
    if _interpreting() if interpret is None else interpret:
        return dict(meta, BLOCK_P=4)
    table = {"pool": POOL_FWD_BLOCK_P, "lift": LIFT_FWD_BLOCK_P}[kernel]
    return dict(meta, BLOCK_P=table[1] if dtype in (torch.float16, torch.bfloat16) else table[0])


def _pool_bwd_meta(c: int, interpret: bool | None = None) -> dict:
    return dict(BLOCK_P=_pick(BWD_BLOCK_P, interpret), BLOCK_C=_block_c(c), num_warps=BWD_NUM_WARPS)


def _lift_bwd_depth_meta(c: int, dtype: torch.dtype, interpret: bool | None = None) -> dict:
    return dict(BLOCK_P=_pick(LIFT_BWD_DEPTH_BLOCK_P, interpret), BLOCK_C=_block_c(c),
                IS_F64=dtype == torch.float64, num_warps=BWD_NUM_WARPS)


def _lift_bwd_feats_meta(c: int, dtype: torch.dtype, interpret: bool | None = None) -> dict:
    return dict(BLOCK_Q=_pick(LIFT_BWD_FEATS_BLOCK_Q, interpret), BLOCK_C=_block_c(c),
                IS_F64=dtype == torch.float64, num_warps=BWD_NUM_WARPS)


def aot_variants() -> list:
    """Every launch variant the launchers below can produce on a GPU, for `bevfusion.ops.triton_aot`:
    each supported dtype x each channel block size (C = the block size itself, C = 80 is the same
    specialisation as C = 128), with the GPU values of the tables above."""
    from ..triton_aot import I64, launch, ptr

    out = []
    for dtype in SUPPORTED_DTYPES:
        f = ptr(dtype)
        for c in sorted({_block_c(c) for c in range(1, 1025)}):
            tag = f"{f[1:]} C={c}"
            fwd = _fwd_meta(c, dtype, interpret=False)
            lift = _fwd_meta(c, dtype, interpret=False, kernel="lift")
            out += [
                launch("bev_pool", _pool_fwd_kernel, tag, hot=True, meta=fwd,
                       args=dict(feats_ptr=f, order_ptr=I64, cell_ptr_ptr=I64, launch_ptr=I64, out_ptr=f, C=c)),
                launch("bev_pool", _pool_bwd_kernel, tag, hot=True, meta=_pool_bwd_meta(c, interpret=False),
                       args=dict(grad_ptr=f, cells_ptr=I64, gfeats_ptr=f, N="i32", C=c)),
                launch("bev_pool", _lift_fwd_kernel, tag, hot=True, meta=lift,
                       args=dict(depth_ptr=f, feats_ptr=f, order_ptr=I64, cell_ptr_ptr=I64, launch_ptr=I64,
                                 out_ptr=f, C=c, DP="i32", P="i32")),
                launch("bev_pool", _lift_bwd_depth_kernel, tag, hot=True,
                       meta=_lift_bwd_depth_meta(c, dtype, interpret=False),
                       args=dict(grad_ptr=f, feats_ptr=f, cells_ptr=I64, gdepth_ptr=f, N="i32", C=c, DP="i32",
                                 P="i32")),
                launch("bev_pool", _lift_bwd_feats_kernel, tag, hot=True,
                       meta=_lift_bwd_feats_meta(c, dtype, interpret=False),
                       args=dict(grad_ptr=f, depth_ptr=f, cells_ptr=I64, gfeats_ptr=f, NPIX="i32", C=c, D="i32",
                                 P="i32")),
            ]
    return out


# ----------------------------------------------------------------------------- launchers
def _on(t: torch.Tensor):
    """Launch on the tensor's GPU, not on whichever device is current (multi-GPU processes)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def pool_forward(feats: torch.Tensor, plan: BevPoolPlan) -> torch.Tensor:
    """(N, C) contiguous features -> (G, C) cell sums, same dtype (fp32 accumulation)."""
    c = feats.shape[1]
    out = torch.empty(plan.num_cells, c, dtype=feats.dtype, device=feats.device)
    if c == 0:
        return out
    meta = _fwd_meta(c, feats.dtype)
    grid = (plan.num_cells, triton.cdiv(c, meta["BLOCK_C"]))
    with _on(feats):
        _pool_fwd_kernel[grid](feats, plan.order, plan.cell_ptr, plan.launch_cells, out, c, **meta)
    return out


def pool_backward(grad_cells: torch.Tensor, plan: BevPoolPlan) -> torch.Tensor:
    """(G, C) contiguous output gradient -> (N, C) feature gradient (zero rows for dropped points)."""
    n, c = plan.num_points, grad_cells.shape[1]
    out = torch.empty(n, c, dtype=grad_cells.dtype, device=grad_cells.device)
    if n == 0 or c == 0:
        return out
    meta = _pool_bwd_meta(c)
    with _on(grad_cells):
        _pool_bwd_kernel[(triton.cdiv(n, meta["BLOCK_P"]), triton.cdiv(c, meta["BLOCK_C"]))](
            grad_cells, plan.point_cells, out, n, c, **meta)
    return out


def lift_forward(depth: torch.Tensor, feats: torch.Tensor, plan: BevPoolPlan) -> torch.Tensor:
    """depth (BN, D, fH, fW), feats (BN, fH, fW, C), both contiguous -> (G, C) in feats' dtype."""
    _, d_bins, fh, fw = depth.shape
    c = feats.shape[-1]
    out = torch.empty(plan.num_cells, c, dtype=feats.dtype, device=feats.device)
    if c == 0:
        return out
    meta = _fwd_meta(c, feats.dtype, kernel="lift")
    grid = (plan.num_cells, triton.cdiv(c, meta["BLOCK_C"]))
    with _on(feats):
        _lift_fwd_kernel[grid](depth, feats, plan.order, plan.cell_ptr, plan.launch_cells, out, c,
                               d_bins * fh * fw, fh * fw, **meta)
    return out


def lift_backward(grad_cells: torch.Tensor, depth: torch.Tensor, feats: torch.Tensor, plan: BevPoolPlan,
                  need_depth: bool = True, need_feats: bool = True):
    """(G, C) output gradient -> (grad_depth or None, grad_feats or None)."""
    bn, d_bins, fh, fw = depth.shape
    c = feats.shape[-1]
    p = fh * fw
    grad_depth = grad_feats = None
    with _on(feats):
        if need_depth:
            grad_depth = torch.empty_like(depth)
            n = depth.numel()
            if n and c:
                meta = _lift_bwd_depth_meta(c, feats.dtype)
                _lift_bwd_depth_kernel[(triton.cdiv(n, meta["BLOCK_P"]),)](
                    grad_cells, feats, plan.point_cells, grad_depth, n, c, d_bins * p, p, **meta)
            elif n:
                grad_depth.zero_()
        if need_feats:
            grad_feats = torch.empty_like(feats)
            npix = bn * p
            if npix and c:
                meta = _lift_bwd_feats_meta(c, feats.dtype)
                _lift_bwd_feats_kernel[(triton.cdiv(npix, meta["BLOCK_Q"]), triton.cdiv(c, meta["BLOCK_C"]))](
                    grad_cells, depth, plan.point_cells, grad_feats, npix, c, d_bins, p, **meta)
    return grad_depth, grad_feats
