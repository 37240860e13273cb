"""Box ops on (M, 7+) 3D boxes: corners, rotated BEV IoU and intersection area, NMS, circle NMS,
points-in-boxes.

Box convention (internal, LiDAR frame; `bevfusion.structures.boxes`): columns (x, y, z, dx, dy, dz,
yaw, ...) with (x, y, z) the **geometric centre**, dx the size along the heading, dy across it, dz the
height, yaw the heading **counter-clockwise from +x** in radians; extra columns (velocity, ...) are
ignored. The official old-mmdet3d boxes differ ((w, l, h), yaw_mm = -yaw - pi/2, "bottom" z; facts
§6.3): convert at the data / head boundary (`structures.boxes.official_to_internal`), not here.

* `box_corners_bev` (..., 4, 2) and `box_corners_3d` (..., 8, 3): counter-clockwise from the
  front-left corner; bottom face then top face. Plain torch, differentiable.
* `rotated_iou_bev(a, b, aligned=False)`: exact IoU of the rotated BEV rectangles (convex polygon
  intersection) → (M, K), or (M,) for aligned pairs; leading batch dims broadcast as (B, M, K).
* `rotated_intersection_bev(a, b, aligned=False)`: the same polygon intersection's area in m² (the BEV
  part of a 3D IoU, e.g. the TransFusion assigner's official [z, z + h] IoU).
* `nms_bev(boxes, scores, iou_threshold, pre_max, post_max, min_union=0)`: greedy NMS with rotated BEV IoU
  (suppress when IoU > threshold, as mmdet3d's nms_gpu; `min_union=1e-8` also clamps the union as its
  `iou_bev` does); kept indices by decreasing score.
* `circle_nms(centers, scores, dist_threshold, post_max)`: CenterPoint's circle NMS (suppress when the
  **squared** centre distance <= dist_threshold: CenterHead's `min_radius` values [4, 12, 10, 1,
  0.85, 0.175] are compared with squared metres, as in mmdet3d's `circle_nms`).
* `points_in_boxes(points, boxes)` (P, M) bool, faces inclusive; `points_in_boxes_idx` (P,) index of
  the first box holding each point, -1 for none.
* `batched_nms_bev`, `batched_circle_nms`: per-sample lists.

Ties in score keep the lower index first (stable sort). The ops are not differentiable (no gradient
flows through IoU / masks / indices); corners are.

Implementations (`impl`): "reference" (Python loops, float64: the oracle), "cpu" (numba, float64),
"triton" (CUDA tensors, float32 arithmetic; float64 boxes take the CPU path for IoU and NMS; CPU tensors under
TRITON_INTERPRET=1) and "auto" (triton for CUDA tensors, cpu otherwise). Importing this package needs
torch only.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from bevfusion.ops._dispatch import resolve_impl

from .reference import (SUPPORTED_DTYPES, box_corners_3d, box_corners_bev, circle_nms_reference, descending_order,
                        nms_bev_reference, points_in_boxes_reference, rotated_intersection_bev_reference,
                        rotated_iou_bev_reference)

__all__ = ["box_corners_bev", "box_corners_3d", "rotated_iou_bev", "rotated_intersection_bev", "nms_bev",
           "circle_nms", "points_in_boxes", "points_in_boxes_idx", "batched_nms_bev", "batched_circle_nms", "IMPLS"]

IMPLS = ("auto", "reference", "cpu", "triton")


# ----------------------------------------------------------------------------- checks and dispatch
def _check_float(op: str, name: str, t, dims: Sequence[int], min_cols: int) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a tensor, got {type(t).__name__}")
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{op}: {name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
    if t.dim() not in dims or t.shape[-1] < min_cols:
        want = " or ".join(f"{d}-D" for d in dims)
        raise ValueError(f"{op}: {name} must be {want} with at least {min_cols} columns, got {tuple(t.shape)}")


def _check_sizes(op: str, name: str, boxes: torch.Tensor) -> None:
    """Negative sizes are an error (one host sync on CUDA); NaN boxes overlap nothing."""
    if boxes.numel() and bool((boxes[..., 3:6] < 0).any()):
        raise ValueError(f"{op}: {name} has negative sizes (columns 3:6 are dx, dy, dz >= 0)")


def _check_scores(op: str, scores, n: int, device) -> None:
    if not isinstance(scores, torch.Tensor):
        raise TypeError(f"{op}: scores must be a tensor, got {type(scores).__name__}")
    if scores.dim() != 1 or scores.shape[0] != n:
        raise ValueError(f"{op}: scores must be (N,) with N = {n} (one per box), got {tuple(scores.shape)}")
    if scores.is_complex() or scores.dtype == torch.bool:
        raise TypeError(f"{op}: scores must be real numbers, got {scores.dtype}")
    if scores.device != device:
        raise ValueError(f"{op}: scores are on {scores.device} but the boxes are on {device}")


def _check_max(op: str, name: str, v) -> Optional[int]:
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"{op}: {name} must be an int or None, got {v!r}")
    if v < 0:
        raise ValueError(f"{op}: {name} must be >= 0, got {v}")
    return v


def _resolve_impl(op: str, impl: str, device: torch.device) -> str:
    return resolve_impl(op, impl, device, IMPLS)


def _iou_2d(a: torch.Tensor, b: torch.Tensor, aligned: bool, impl: str, area: bool = False,
            min_union: float = 0.0) -> torch.Tensor:
    """IoU (or with area=True the intersection area) of (M, 7+) and (K, 7+) boxes on one impl."""
    if impl == "triton":
        from . import triton as triton_impl

        if a.is_cuda and a.dtype not in triton_impl.IOU_GPU_DTYPES:
            # float64 boxes on a GPU: the CPU path in float64 (see IOU_GPU_DTYPES), result back on the GPU
            return _iou_2d(a.cpu(), b.cpu(), aligned, "cpu", area, min_union).to(a.device)
        return triton_impl.rotated_iou_bev(a, b, aligned, area, min_union)
    if impl == "cpu":
        from . import cpu

        return cpu.rotated_iou_bev(a, b, aligned, area, min_union)
    if area:
        return rotated_intersection_bev_reference(a, b, aligned)
    return rotated_iou_bev_reference(a, b, aligned, min_union)


def _check_min_union(op: str, v) -> float:
    v = float(v)
    if not v >= 0:
        raise ValueError(f"{op}: min_union must be >= 0 (square metres), got {v}")
    return v


# ----------------------------------------------------------------------------- public API
def rotated_iou_bev(a: torch.Tensor, b: torch.Tensor, aligned: bool = False, impl: str = "auto",
                    min_union: float = 0.0) -> torch.Tensor:
    """Exact BEV IoU of rotated boxes.

    Args:
        a: (M, 7+) or (B, M, 7+) boxes (internal convention); b: (K, 7+) or (B, K, 7+), same device.
            Reads x, y, dx, dy, yaw. Zero-area pairs give 0.
        aligned: pair a[i] with b[i] (M == K) instead of all pairs.
        min_union: IoU = intersection / max(union, min_union) (m²). 0 (default): the plain IoU. Old mmdet3d's
            `iou_bev` (its nms_gpu, CenterHead's rotated NMS) uses 1e-8, so two boxes smaller than that
            have an IoU below 1 even when identical.
    Returns:
        (M, K) (or (B, M, K); (M,) / (B, M) if aligned) in a's dtype, values in [0, 1].
    """
    return _pairwise("rotated_iou_bev", a, b, aligned, impl, area=False,
                     min_union=_check_min_union("rotated_iou_bev", min_union))


def rotated_intersection_bev(a: torch.Tensor, b: torch.Tensor, aligned: bool = False,
                             impl: str = "auto") -> torch.Tensor:
    """Exact area of the intersection of rotated BEV rectangles (the polygon `rotated_iou_bev` measures).

    Args:
        a: (M, 7+) or (B, M, 7+) boxes (internal convention); b: (K, 7+) or (B, K, 7+), same device.
            Reads x, y, dx, dy, yaw.
        aligned: pair a[i] with b[i] (M == K) instead of all pairs.
    Returns:
        (M, K) (or (B, M, K); (M,) / (B, M) if aligned) in a's dtype, square metres, >= 0; 0 for disjoint,
        touching or zero-area pairs. "reference" and "cpu" compute in float64, "triton" in float32 for
        float32/16 boxes (float64 boxes on a GPU take the CPU path).
    """
    return _pairwise("rotated_intersection_bev", a, b, aligned, impl, area=True)


def _pairwise(op: str, a: torch.Tensor, b: torch.Tensor, aligned: bool, impl: str, area: bool,
              min_union: float = 0.0) -> torch.Tensor:
    _check_float(op, "a", a, (2, 3), 7)
    _check_float(op, "b", b, (2, 3), 7)
    if a.dim() != b.dim() or (a.dim() == 3 and a.shape[0] != b.shape[0]):
        raise ValueError(f"{op}: a {tuple(a.shape)} and b {tuple(b.shape)} must both be (N, 7+) or (B, N, 7+) "
                         "with the same B")
    if a.device != b.device:
        raise ValueError(f"{op}: a is on {a.device} but b is on {b.device}")
    _check_sizes(op, "a", a)
    _check_sizes(op, "b", b)
    if aligned and a.shape[-2] != b.shape[-2]:
        raise ValueError(f"{op}: aligned=True needs as many boxes in a as in b, got {a.shape[-2]} and {b.shape[-2]}")
    impl = _resolve_impl(op, impl, a.device)
    if a.dim() == 3:
        outs = [_iou_2d(x, y, aligned, impl, area, min_union) for x, y in zip(a, b)]
        shape = (a.shape[0], a.shape[1]) if aligned else (a.shape[0], a.shape[1], b.shape[1])
        return torch.stack(outs) if outs else a.new_zeros(shape)
    return _iou_2d(a, b, aligned, impl, area, min_union).to(a.device)


def nms_bev(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float, pre_max: Optional[int] = None,
            post_max: Optional[int] = None, impl: str = "auto", min_union: float = 0.0) -> torch.Tensor:
    """Greedy NMS with rotated BEV IoU.

    Boxes are visited by decreasing score (ties: lower index first); only the `pre_max` best are
    considered; a box is dropped when its IoU with an already kept box is > iou_threshold; at most
    `post_max` are returned.

    Args:
        boxes: (N, 7+) internal convention; scores: (N,) on the same device.
        min_union: the IoU's union is clamped to at least this (m², see `rotated_iou_bev`); old mmdet3d's
            nms_gpu uses 1e-8.
    Returns:
        (K,) int64 indices into boxes, by decreasing score, on the boxes' device.
    """
    op = "nms_bev"
    _check_float(op, "boxes", boxes, (2,), 7)
    _check_sizes(op, "boxes", boxes)
    _check_scores(op, scores, boxes.shape[0], boxes.device)
    pre_max = _check_max(op, "pre_max", pre_max)
    post_max = _check_max(op, "post_max", post_max)
    thr = float(iou_threshold)
    min_union = _check_min_union(op, min_union)
    impl = _resolve_impl(op, impl, boxes.device)
    if impl == "reference":
        return nms_bev_reference(boxes, scores, thr, pre_max, post_max, min_union)
    order = descending_order(scores)[:pre_max]
    n_post = len(order) if post_max is None else post_max
    if len(order) == 0 or n_post == 0:
        return torch.zeros(0, dtype=torch.int64, device=boxes.device)
    cand = boxes.detach()[order]
    from . import cpu

    host_f64 = False
    if impl == "triton":
        from . import triton as triton_impl

        # float64 boxes on a GPU get their IoUs from the CPU path anyway (IOU_GPU_DTYPES): there, the lazy
        # greedy pass below computes only the pairs it needs, with the same float64 IoU and decisions
        host_f64 = cand.is_cuda and cand.dtype not in triton_impl.IOU_GPU_DTYPES
    if impl == "triton" and not host_f64:
        over = _iou_2d(cand, cand, False, impl, min_union=min_union) > thr
        pos = cpu.greedy_from_mask(over, n_post)
    else:
        pos = cpu.nms_sorted(cand, thr, n_post, min_union)
    return order[pos.to(order.device)]


def circle_nms(centers: torch.Tensor, scores: torch.Tensor, dist_threshold: float, post_max: Optional[int] = None,
               impl: str = "auto") -> torch.Tensor:
    """CenterPoint circle NMS: visit by decreasing score, drop a centre whose squared BEV distance to
    an already kept one is <= dist_threshold (m^2; CenterHead's `min_radius`).

    Args:
        centers: (N, 2+) columns x, y (boxes work too); scores: (N,).
    Returns:
        (K,) int64 indices by decreasing score, at most post_max, on the centres' device.
    """
    op = "circle_nms"
    _check_float(op, "centers", centers, (2,), 2)
    _check_scores(op, scores, centers.shape[0], centers.device)
    post_max = _check_max(op, "post_max", post_max)
    thr = float(dist_threshold)
    impl = _resolve_impl(op, impl, centers.device)
    if impl == "reference":
        return circle_nms_reference(centers, scores, thr, post_max)
    order = descending_order(scores)
    n_post = len(order) if post_max is None else post_max
    if len(order) == 0 or n_post == 0:
        return torch.zeros(0, dtype=torch.int64, device=centers.device)
    xy = centers.detach()[order, :2]
    xy = xy.double() if xy.dtype == torch.float64 else xy.float()
    from . import cpu

    if impl == "cpu":
        pos = cpu.circle_nms_sorted(xy, thr, n_post)
    else:
        # the squared distance in xy's dtype, compared in float64 (as mmdet3d's numba circle_nms); the
        # greedy pass over the (N, N) mask runs on the host
        d = xy[:, None, :] - xy[None, :, :]  # (N, N, 2)
        over = (d[..., 0] * d[..., 0] + d[..., 1] * d[..., 1]).double() <= thr
        pos = cpu.greedy_from_mask(over, n_post)
    return order[pos.to(order.device)]


def points_in_boxes(points: torch.Tensor, boxes: torch.Tensor, impl: str = "auto") -> torch.Tensor:
    """Which box holds which point.

    Args:
        points: (P, 3+) or (B, P, 3+) columns x, y, z (metres, LiDAR frame), any strides.
        boxes: (M, 7+) or (B, M, 7+) internal convention, same device.
    Returns:
        (P, M) (or (B, P, M)) bool: |local x| <= dx/2, |local y| <= dy/2, |z - z_centre| <= dz/2 (faces
        inclusive). "cpu" and "reference" decide in float64; "triton" in float32 for float32/16 input,
        so points within ~1e-6 relative of a face may differ.
    """
    op = "points_in_boxes"
    _check_float(op, "points", points, (2, 3), 3)
    _check_float(op, "boxes", boxes, (2, 3), 7)
    if points.dim() != boxes.dim() or (points.dim() == 3 and points.shape[0] != boxes.shape[0]):
        raise ValueError(f"{op}: points {tuple(points.shape)} and boxes {tuple(boxes.shape)} must be (P, 3+) and "
                         "(M, 7+), or (B, P, 3+) and (B, M, 7+) with the same B")
    if points.device != boxes.device:
        raise ValueError(f"{op}: points are on {points.device} but boxes on {boxes.device}")
    _check_sizes(op, "boxes", boxes)
    impl = _resolve_impl(op, impl, points.device)
    if points.dim() == 3:
        outs = [points_in_boxes(p, b, impl=impl) for p, b in zip(points, boxes)]
        return torch.stack(outs) if outs else torch.zeros((0, points.shape[1], boxes.shape[1]), dtype=torch.bool,
                                                          device=points.device)
    if impl == "triton":
        from . import triton as triton_impl

        return triton_impl.points_in_boxes(points, boxes)
    if impl == "cpu":
        from . import cpu

        return cpu.points_in_boxes(points, boxes)
    return points_in_boxes_reference(points, boxes)


def points_in_boxes_idx(points: torch.Tensor, boxes: torch.Tensor, impl: str = "auto") -> torch.Tensor:
    """(P, 3+), (M, 7+) → (P,) int64 index of the first box holding each point, -1 for none (also (B, P))."""
    inside = points_in_boxes(points, boxes, impl=impl)
    if inside.shape[-1] == 0:
        return torch.full(inside.shape[:-1], -1, dtype=torch.int64, device=inside.device)
    first = inside.to(torch.uint8).argmax(dim=-1)  # first True (argmax returns the first maximum)
    return torch.where(inside.any(dim=-1), first, torch.full_like(first, -1))


def batched_nms_bev(boxes: Sequence[torch.Tensor], scores: Sequence[torch.Tensor], iou_threshold: float,
                    pre_max: Optional[int] = None, post_max: Optional[int] = None, impl: str = "auto",
                    min_union: float = 0.0):
    """`nms_bev` per sample: lists of (N_b, 7+) boxes and (N_b,) scores → list of kept index tensors."""
    if len(boxes) != len(scores):
        raise ValueError(f"batched_nms_bev: {len(boxes)} box tensors but {len(scores)} score tensors")
    return [nms_bev(b, s, iou_threshold, pre_max, post_max, impl=impl, min_union=min_union)
            for b, s in zip(boxes, scores)]


def batched_circle_nms(centers: Sequence[torch.Tensor], scores: Sequence[torch.Tensor], dist_threshold: float,
                       post_max: Optional[int] = None, impl: str = "auto"):
    """`circle_nms` per sample: lists of (N_b, 2+) centres and (N_b,) scores → list of kept index tensors."""
    if len(centers) != len(scores):
        raise ValueError(f"batched_circle_nms: {len(centers)} centre tensors but {len(scores)} score tensors")
    return [circle_nms(c, s, dist_threshold, post_max, impl=impl) for c, s in zip(centers, scores)]
