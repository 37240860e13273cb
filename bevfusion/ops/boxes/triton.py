"""Triton box kernels (CUDA tensors; CPU tensors under TRITON_INTERPRET=1 for the tests).

* `_iou_kernel`: one lane per box pair (the full M x K matrix, or aligned pairs). The same
  algorithm as `cpu.py` (box b in box a's frame, Sutherland–Hodgman against a's four sides, shoelace),
  vectorised: each lane's polygon lives in 8 slots of a (BLOCK, 8) tile, and a clip step compacts its
  output with an exclusive prefix sum and a one-hot (BLOCK, 8, 8) select, so there is no
  data-dependent control flow. A convex quad clipped by four half-planes has at most 8 vertices.
  Arithmetic in float32 (float64 for float64 boxes). With AREA it stores the intersection area (m^2)
  instead of the IoU (`rotated_intersection_bev`).
* `_points_kernel`: a (points x boxes) tile of the inside test.

NMS on the GPU = the IoU matrix here, `iou > threshold` on the device, and the greedy pass over that
mask on the host (`cpu.greedy_from_mask`).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_PAIRS = 64


@triton.jit
def _next_slot(v, n, slot):
    """v: (B, 8) polygon coordinate, n: (B,) vertex count → v[(i + 1) % n] per slot i."""
    nxt = tl.where(slot + 1 < n[:, None], slot + 1, 0)  # (B, 8)
    onehot = nxt[:, :, None] == slot[None, None, :]  # (B, 8 [i], 8 [j])
    return tl.sum(tl.where(onehot, v[:, None, :], 0.0), axis=2)


@triton.jit
def _clip(px, py, n, nx: tl.constexpr, ny: tl.constexpr, h, slot):
    """Keep the part of each lane's polygon with nx*x + ny*y <= h. Returns (px, py, n)."""
    qx = _next_slot(px, n, slot)
    qy = _next_slot(py, n, slot)
    valid = slot[None, :] < n[:, None]
    dp = nx * px + ny * py - h[:, None]
    dq = nx * qx + ny * qy - h[:, None]
    inp = dp <= 0
    inq = dq <= 0
    e1 = valid & inp  # keep the vertex
    e2 = valid & (inp != inq)  # the edge crosses the line: emit the crossing
    t = tl.where(e2, dp / tl.where(e2, dp - dq, 1.0), 0.0)
    ix = px + t * (qx - px)
    iy = py + t * (qy - py)
    cnt = e1.to(tl.int32) + e2.to(tl.int32)
    pos1 = tl.cumsum(cnt, axis=1) - cnt  # exclusive prefix sum: output slot of the vertex
    pos2 = pos1 + e1.to(tl.int32)  # output slot of the crossing
    s3 = slot[None, None, :]  # (1, 1, 8 [output slot])
    sel1 = e1[:, :, None] & (pos1[:, :, None] == s3)
    sel2 = e2[:, :, None] & (pos2[:, :, None] == s3)
    ox = tl.sum(tl.where(sel1, px[:, :, None], 0.0) + tl.where(sel2, ix[:, :, None], 0.0), axis=1)
    oy = tl.sum(tl.where(sel1, py[:, :, None], 0.0) + tl.where(sel2, iy[:, :, None], 0.0), axis=1)
    return ox, oy, tl.minimum(tl.sum(cnt, axis=1), 8)


@triton.jit
def _iou_kernel(a_ptr, b_ptr, out_ptr, total, K, ALIGNED: tl.constexpr, AREA: tl.constexpr, F64: tl.constexpr,
                BLOCK: tl.constexpr):
    """a: (M, 5), b: (K, 5) rows (x, y, dx, dy, yaw), contiguous, compute dtype; total = M*K (M if aligned),
    passed from the host so that it is int64 when large (and no `.to` on an argument that Triton may
    specialise to the constant 1)."""
    ct = tl.float64 if F64 else tl.float32
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    live = idx < total
    if ALIGNED:
        i = idx
        j = idx
    else:
        i = idx // K
        j = idx % K
    ax = tl.load(a_ptr + i * 5, mask=live, other=0.0)
    ay = tl.load(a_ptr + i * 5 + 1, mask=live, other=0.0)
    adx = tl.load(a_ptr + i * 5 + 2, mask=live, other=0.0)
    ady = tl.load(a_ptr + i * 5 + 3, mask=live, other=0.0)
    ayaw = tl.load(a_ptr + i * 5 + 4, mask=live, other=0.0)
    bx = tl.load(b_ptr + j * 5, mask=live, other=0.0)
    by = tl.load(b_ptr + j * 5 + 1, mask=live, other=0.0)
    bdx = tl.load(b_ptr + j * 5 + 2, mask=live, other=0.0)
    bdy = tl.load(b_ptr + j * 5 + 3, mask=live, other=0.0)
    byaw = tl.load(b_ptr + j * 5 + 4, mask=live, other=0.0)
    # box b in box a's frame
    ca = tl.cos(ayaw)
    sa = tl.sin(ayaw)
    dx = bx - ax
    dy = by - ay
    ox = dx * ca + dy * sa
    oy = -dx * sa + dy * ca
    cr = tl.cos(byaw - ayaw)
    sr = tl.sin(byaw - ayaw)
    slot = tl.arange(0, 8)
    # corner signs: (+,+), (-,+), (-,-), (+,-) for slots 0..3; slots 4..7 unused (n = 4)
    sx = tl.where((slot == 0) | (slot == 3), 1.0, -1.0).to(ct)
    sy = tl.where(slot < 2, 1.0, -1.0).to(ct)
    lx = sx[None, :] * (bdx * 0.5)[:, None]
    ly = sy[None, :] * (bdy * 0.5)[:, None]
    px = ox[:, None] + lx * cr[:, None] - ly * sr[:, None]
    py = oy[:, None] + lx * sr[:, None] + ly * cr[:, None]
    n = tl.full((BLOCK,), 4, tl.int32)
    hx = adx * 0.5
    hy = ady * 0.5
    px, py, n = _clip(px, py, n, 1.0, 0.0, hx, slot)
    px, py, n = _clip(px, py, n, -1.0, 0.0, hx, slot)
    px, py, n = _clip(px, py, n, 0.0, 1.0, hy, slot)
    px, py, n = _clip(px, py, n, 0.0, -1.0, hy, slot)
    qx = _next_slot(px, n, slot)
    qy = _next_slot(py, n, slot)
    valid = slot[None, :] < n[:, None]
    inter = tl.abs(tl.sum(tl.where(valid, px * qy - qx * py, 0.0), axis=1)) * 0.5
    if AREA:
        tl.store(out_ptr + idx, inter, mask=live)
    else:
        union = adx * ady + bdx * bdy - inter
        iou = tl.where(union > 0, inter / tl.where(union > 0, union, 1.0), 0.0)
        iou = tl.minimum(tl.maximum(iou, 0.0), 1.0)
        tl.store(out_ptr + idx, iou, mask=live)


@triton.jit
def _points_kernel(p_ptr, stride_p, stride_f, tab_ptr, out_ptr, P, M,
                   F64: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_M: tl.constexpr):
    """tab: (M, 9) rows (x, y, z, dx/2, dy/2, dz/2, cos, sin, unused); out: (P, M) int8."""
    ct = tl.float64 if F64 else tl.float32
    i = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    li, lm = i < P, m < M
    row = p_ptr + i.to(tl.int64) * stride_p
    px = tl.load(row, mask=li, other=0).to(ct)
    py = tl.load(row + stride_f, mask=li, other=0).to(ct)
    pz = tl.load(row + 2 * stride_f, mask=li, other=0).to(ct)
    t = tab_ptr + m * 9
    cx = tl.load(t, mask=lm, other=0.0)
    cy = tl.load(t + 1, mask=lm, other=0.0)
    cz = tl.load(t + 2, mask=lm, other=0.0)
    hx = tl.load(t + 3, mask=lm, other=-1.0)  # masked boxes contain nothing
    hy = tl.load(t + 4, mask=lm, other=-1.0)
    hz = tl.load(t + 5, mask=lm, other=-1.0)
    c = tl.load(t + 6, mask=lm, other=1.0)
    s = tl.load(t + 7, mask=lm, other=0.0)
    dx = px[:, None] - cx[None, :]
    dy = py[:, None] - cy[None, :]
    lx = dx * c[None, :] + dy * s[None, :]
    ly = -dx * s[None, :] + dy * c[None, :]
    inside = (tl.abs(lx) <= hx[None, :]) & (tl.abs(ly) <= hy[None, :]) & \
        (tl.abs(pz[:, None] - cz[None, :]) <= hz[None, :])
    mask = li[:, None] & lm[None, :]
    tl.store(out_ptr + i.to(tl.int64)[:, None] * M + m[None, :], inside.to(tl.int8), mask=mask)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# Box dtypes whose IoU runs on a GPU. float64 is left out: with triton 3.6 the float64 `_iou_kernel`
# does not compile for sm_80/sm_90 (TritonGPURemoveLayoutConversions fails in `_clip`), and with 3.9 it
# spills ~150 KB per thread. `bevfusion.ops.boxes` sends float64 boxes on a GPU through the CPU path
# (float64, exact as before); the interpreter still runs the float64 kernel for the tests.
IOU_GPU_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# Kernel keyword arguments, read by the launchers and by `aot_variants`.
POINTS_BLOCK = (64, 32)  # (points, boxes) per program of _points_kernel


def _iou_meta(aligned: bool, ct: torch.dtype, area: bool = False) -> dict:
    return dict(ALIGNED=aligned, AREA=area, F64=ct == torch.float64, BLOCK=BLOCK_PAIRS)


def _points_meta(ct: torch.dtype) -> dict:
    return dict(F64=ct == torch.float64, BLOCK_P=POINTS_BLOCK[0], BLOCK_M=POINTS_BLOCK[1])


def aot_variants() -> list:
    """Every launch the launchers below can make on a GPU, for `bevfusion.ops.triton_aot`: IoU (then
    the intersection area) per compute dtype x aligned or not; points-in-boxes per points dtype x
    compute dtype (float64 when the points or the boxes are float64). The first variant (IoU, all
    pairs) is the kernel's edge case and the one compiled by the default test suite."""
    from ..triton_aot import I8, launch, ptr
    from .reference import SUPPORTED_DTYPES

    out = []
    for area in (False, True):
        for ct in sorted({_compute_dtype(d) for d in IOU_GPU_DTYPES}, key=str):
            c = ptr(ct)
            for aligned in (False, True):
                label = f"{c[1:]} {'aligned' if aligned else 'all pairs'}" + (" area" if area else "")
                out.append(launch("boxes", _iou_kernel, label, hot=False, meta=_iou_meta(aligned, ct, area),
                                  args=dict(a_ptr=c, b_ptr=c, out_ptr=c, total="i32", K="i32")))
    for pdt in SUPPORTED_DTYPES:
        for bdt in SUPPORTED_DTYPES:
            ct = torch.float64 if torch.float64 in (pdt, bdt) else torch.float32  # as points_in_boxes
            out.append(launch("boxes", _points_kernel, f"points {ptr(pdt)[1:]} math {ptr(ct)[1:]}", hot=False,
                              meta=_points_meta(ct), args=dict(p_ptr=ptr(pdt), stride_p="i32", stride_f=1,
                                                               tab_ptr=ptr(ct), out_ptr=I8, P="i32", M="i32")))
    return out


def rotated_iou_bev(a: torch.Tensor, b: torch.Tensor, aligned: bool, area: bool = False,
                    min_union: float = 0.0) -> torch.Tensor:
    """IoU, or with area=True the intersection area (m^2), in the compute dtype; returned in a's dtype.

    With min_union > 0 the IoU is inter / max(union, min_union): the kernel gives the intersection
    areas and the division happens here, in the compute dtype."""
    ct = _compute_dtype(a.dtype)
    ra = a.detach()[:, [0, 1, 3, 4, 6]].to(ct).contiguous()
    rb = b.detach()[:, [0, 1, 3, 4, 6]].to(ct).contiguous()
    m, k = ra.shape[0], rb.shape[0]
    inter_only = area or min_union > 0
    out = torch.empty((m,) if aligned else (m, k), dtype=ct, device=a.device)
    if out.numel():
        meta = _iou_meta(aligned, ct, inter_only)
        _iou_kernel[(triton.cdiv(out.numel(), meta["BLOCK"]),)](ra, rb, out, out.numel(), k, **meta)
    if inter_only and not area:
        area_a, area_b = ra[:, 2] * ra[:, 3], rb[:, 2] * rb[:, 3]
        union = (area_a + area_b if aligned else area_a[:, None] + area_b[None, :]) - out
        union = union.clamp(min=min_union)
        out = torch.where(union > 0, out / torch.where(union > 0, union, 1.0), 0.0).clamp(0.0, 1.0)
    return out.to(a.dtype)


def points_in_boxes(points: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    from .cpu import box_table

    ct = torch.float64 if torch.float64 in (points.dtype, boxes.dtype) else torch.float32
    tab = box_table(boxes, ct)
    p, m = points.shape[0], tab.shape[0]
    out = torch.zeros((p, m), dtype=torch.int8, device=points.device)
    if p and m:
        meta = _points_meta(ct)
        _points_kernel[(triton.cdiv(p, meta["BLOCK_P"]), triton.cdiv(m, meta["BLOCK_M"]))](
            points, points.stride(0), points.stride(1), tab, out, p, m, **meta)
    return out.view(torch.bool)
