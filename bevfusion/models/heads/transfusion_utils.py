"""TransFusion helpers: box coder, Hungarian assigner with the official costs, 3D IoU, Gaussian targets.

Boxes here are in the **official** (old mmdet3d) layout, because the head works in it end to end so that
official checkpoints give the same numbers:

    (x, y, z, w, l, h, yaw_mm[, vx, vy]), z = the value the official code calls the box bottom.

Official info files store the geometric-centre z there (the "z quirk", facts §6.3) and the released
checkpoints were trained on that, so `z` here equals our internal centre z and no shift is applied at
the head boundary; see `bevfusion.models.heads.transfusion` for the conversion.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np
import torch


def cfg_get(cfg: Mapping[str, Any] | None, key: str, default: Any = None) -> Any:
    """`cfg[key]` if the (optional) config section has it, else `default`."""
    if cfg is None:
        return default
    return cfg[key] if key in cfg else default

__all__ = [
    "cfg_get",
    "TransFusionBBoxCoder",
    "HungarianAssigner3D",
    "AssignResult",
    "FocalLossCost",
    "BBoxBEVL1Cost",
    "IoU3DCost",
    "BboxOverlaps3D",
    "official_to_internal_torch",
    "internal_to_official_torch",
    "bev_corners",
    "rotated_bev_overlap",
    "box_iou_3d_official",
    "gaussian_radius",
    "gaussian_2d",
    "draw_heatmap_gaussian",
    "circle_nms",
    "rotated_nms",
]


# ---------------------------------------------------------------------------------------------- conventions
def _wrap_angle(angle: torch.Tensor) -> torch.Tensor:
    """Wrap into [-pi, pi)."""
    return angle - torch.floor(angle / (2 * math.pi) + 0.5) * (2 * math.pi)


def internal_to_official_torch(boxes: torch.Tensor) -> torch.Tensor:
    """Internal (x, y, z, dx, dy, dz, yaw, ...) → official (x, y, z, w, l, h, yaw_mm, ...); z unchanged."""
    out = boxes.clone()
    out[:, 3], out[:, 4] = boxes[:, 4], boxes[:, 3]
    out[:, 6] = _wrap_angle(-boxes[:, 6] - math.pi / 2)
    return out


def official_to_internal_torch(boxes: torch.Tensor) -> torch.Tensor:
    """Official (x, y, z, w, l, h, yaw_mm, ...) → internal (x, y, z, dx, dy, dz, yaw, ...); z unchanged."""
    out = boxes.clone()
    out[:, 3], out[:, 4] = boxes[:, 4], boxes[:, 3]
    out[:, 6] = _wrap_angle(-boxes[:, 6] - math.pi / 2)
    return out


# ---------------------------------------------------------------------------------------------- box coder
class TransFusionBBoxCoder:
    """Encode official boxes to the 10 regression targets and decode head outputs back (facts §4.2).

    Targets: (x - pc_x) / (osf · vx), (y - pc_y) / (osf · vy) in BEV cells, z + h/2 (gravity centre as the
    official code sees it), log w, log l, log h, sin yaw, cos yaw, vx, vy.

    Args:
        pc_range: (x_min, y_min) of the point-cloud range (more values are ignored).
        out_size_factor: BEV cell = out_size_factor voxels.
        voxel_size: (vx, vy) in metres.
        post_center_range: (x0, y0, z0, x1, y1, z1); decoded boxes with a centre outside are dropped
            when decoding with `filter=True`. None keeps all.
        score_threshold: with `filter=True`, keep scores > threshold. As upstream, a falsy value (None or
            0.0) disables the score filter.
        code_size: 10 (with velocity) or 8.
    """

    def __init__(self, pc_range: Sequence[float], out_size_factor: int, voxel_size: Sequence[float],
                 post_center_range: Sequence[float] | None = None, score_threshold: float | None = None,
                 code_size: int = 8):
        if code_size not in (8, 10):
            raise ValueError(f"TransFusionBBoxCoder: code_size must be 8 or 10, got {code_size}")
        self.pc_range = [float(v) for v in pc_range]
        self.out_size_factor = out_size_factor
        self.voxel_size = [float(v) for v in voxel_size]
        self.post_center_range = None if post_center_range is None else [float(v) for v in post_center_range]
        self.score_threshold = score_threshold
        self.code_size = code_size

    def encode(self, boxes: torch.Tensor) -> torch.Tensor:
        """(M, 7 or 9) official boxes → (M, code_size) targets."""
        t = boxes.new_zeros(boxes.shape[0], self.code_size)
        t[:, 0] = (boxes[:, 0] - self.pc_range[0]) / (self.out_size_factor * self.voxel_size[0])
        t[:, 1] = (boxes[:, 1] - self.pc_range[1]) / (self.out_size_factor * self.voxel_size[1])
        t[:, 2] = boxes[:, 2] + boxes[:, 5] * 0.5  # official "bottom" → "gravity centre"
        t[:, 3:6] = boxes[:, 3:6].log()
        t[:, 6] = torch.sin(boxes[:, 6])
        t[:, 7] = torch.cos(boxes[:, 6])
        if self.code_size == 10:
            t[:, 8:10] = boxes[:, 7:9]
        return t

    def decode(self, heatmap: torch.Tensor, rot: torch.Tensor, dim: torch.Tensor, center: torch.Tensor,
               height: torch.Tensor, vel: torch.Tensor | None, filter: bool = False) -> list[dict[str, torch.Tensor]]:
        """Head outputs → per-sample {"bboxes" (K, 7 or 9) official, "scores" (K,), "labels" (K,)}.

        Args:
            heatmap: (B, C, P) class scores; label = argmax over C, score = its value.
            rot: (B, 2, P) (sin, cos). dim: (B, 3, P) log sizes. center: (B, 2, P) BEV cells.
            height: (B, 1, P) gravity-centre z. vel: (B, 2, P) or None.
            filter: apply post_center_range and score_threshold. Inputs are not modified.
        """
        scores, labels = heatmap.max(dim=1)
        cx = center[:, 0:1] * self.out_size_factor * self.voxel_size[0] + self.pc_range[0]
        cy = center[:, 1:2] * self.out_size_factor * self.voxel_size[1] + self.pc_range[1]
        dims = dim.exp()
        z = height - dims[:, 2:3] * 0.5  # "gravity centre" → official "bottom"
        yaw = torch.atan2(rot[:, 0:1], rot[:, 1:2])
        parts = [cx, cy, z, dims, yaw] + ([vel] if vel is not None else [])
        boxes = torch.cat(parts, dim=1).permute(0, 2, 1)  # (B, P, 7 or 9)
        keep = torch.ones(scores.shape, dtype=torch.bool, device=scores.device)
        if filter:
            if self.post_center_range is not None:
                rng = boxes.new_tensor(self.post_center_range)
                keep &= (boxes[..., :3] >= rng[:3]).all(-1) & (boxes[..., :3] <= rng[3:]).all(-1)
            if self.score_threshold:  # upstream: 0.0 disables the filter
                keep &= scores > self.score_threshold
        return [{"bboxes": boxes[i][keep[i]], "scores": scores[i][keep[i]], "labels": labels[i][keep[i]]}
                for i in range(boxes.shape[0])]


# ---------------------------------------------------------------------------------------------- 3D IoU
def bev_corners(boxes: torch.Tensor) -> torch.Tensor:
    """(N, 7+) internal boxes → (N, 4, 2) BEV corners, counter-clockwise."""
    signs = boxes.new_tensor([[0.5, 0.5], [-0.5, 0.5], [-0.5, -0.5], [0.5, -0.5]])
    local = signs[None] * boxes[:, None, 3:5]  # (N, 4, 2)
    c, s = torch.cos(boxes[:, 6])[:, None], torch.sin(boxes[:, 6])[:, None]
    x = local[..., 0] * c - local[..., 1] * s + boxes[:, None, 0]
    y = local[..., 0] * s + local[..., 1] * c + boxes[:, None, 1]
    return torch.stack([x, y], dim=-1)


def _cross2(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return a[..., 0] * b[..., 1] - a[..., 1] * b[..., 0]


def _inside_convex(points: torch.Tensor, poly: torch.Tensor, eps: torch.Tensor | float) -> torch.Tensor:
    """points (..., K, 2), poly (..., 4, 2) counter-clockwise → (..., K) bool (boundary counts as inside)."""
    edges = poly.roll(-1, dims=-2) - poly  # (..., 4, 2)
    rel = points[..., :, None, :] - poly[..., None, :, :]  # (..., K, 4, 2)
    return (_cross2(edges[..., None, :, :].expand_as(rel), rel) >= -eps).all(-1)


def rotated_bev_overlap(boxes_a: torch.Tensor, boxes_b: torch.Tensor) -> torch.Tensor:
    """Exact BEV intersection area of every pair of rotated rectangles.

    Args:
        boxes_a: (N, 7+) internal boxes. boxes_b: (M, 7+). Computed in float64.
    Returns:
        (N, M) float64 area in m².

    Pairs whose circumscribed circles are disjoint are zero without further work. For the others, the
    intersection of two convex quads is the convex hull of: corners of A inside B, corners of B inside
    A, and edge/edge crossings; those (≤ 24) candidates are sorted by angle about their mean and summed
    with the shoelace formula (invalid candidates are replaced by the first valid one, adding zero).
    """
    a64, b64 = boxes_a.double(), boxes_b.double()
    out = a64.new_zeros(boxes_a.shape[0], boxes_b.shape[0])
    if out.numel() == 0:
        return out
    ra = torch.hypot(a64[:, 3], a64[:, 4]) / 2
    rb = torch.hypot(b64[:, 3], b64[:, 4]) / 2
    dist = torch.cdist(a64[:, :2], b64[:, :2])
    ia, ib = torch.nonzero(dist < (ra[:, None] + rb[None]) * (1 + 1e-9) + 1e-9, as_tuple=True)
    if len(ia):
        out[ia, ib] = _pair_overlap(bev_corners(a64)[ia], bev_corners(b64)[ib])
    return out


def _pair_overlap(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(K, 4, 2) and (K, 4, 2) counter-clockwise corners → (K,) intersection areas."""
    scale = torch.maximum(a.abs().amax(dim=(-1, -2)), b.abs().amax(dim=(-1, -2))).clamp(min=1.0)
    eps = 1e-9 * scale ** 2  # (K,), in units of area (cross products)
    a_in_b = _inside_convex(a, b, eps[:, None, None])
    b_in_a = _inside_convex(b, a, eps[:, None, None])
    # edge i of A (p → p + r) against edge j of B (q → q + s)
    p, r = a[:, :, None, :], (a.roll(-1, dims=-2) - a)[:, :, None, :]  # (K, 4, 1, 2)
    q, s = b[:, None, :, :], (b.roll(-1, dims=-2) - b)[:, None, :, :]  # (K, 1, 4, 2)
    r, s = r.expand(-1, 4, 4, -1), s.expand(-1, 4, 4, -1)
    qp = q - p
    denom = _cross2(r, s)
    parallel = denom.abs() <= eps[:, None, None]
    safe = torch.where(parallel, torch.ones_like(denom), denom)
    t = _cross2(qp, s) / safe
    u = _cross2(qp, r) / safe
    hit = ~parallel & (t >= 0) & (t <= 1) & (u >= 0) & (u <= 1)
    crossing = (p + t[..., None] * r).flatten(1, 2)  # (K, 16, 2)
    cand = torch.cat([a, b, crossing], dim=1)  # (K, 24, 2)
    valid = torch.cat([a_in_b, b_in_a, hit.flatten(1)], dim=1)  # (K, 24)
    count = valid.sum(-1)
    centre = (cand * valid[..., None].to(cand.dtype)).sum(1) / count.clamp(min=1)[:, None]
    rel = cand - centre[:, None, :]
    angle = torch.atan2(rel[..., 1], rel[..., 0])
    angle = torch.where(valid, angle, torch.full_like(angle, 10.0))  # invalid ones sort last
    order = angle.argsort(dim=-1)
    rel = rel.gather(1, order[..., None].expand_as(rel))
    valid = valid.gather(1, order)
    rel = torch.where(valid[..., None], rel, rel[:, :1, :].expand_as(rel))
    area = 0.5 * _cross2(rel, rel.roll(-1, dims=1)).sum(-1)
    return torch.where(count >= 3, area.clamp(min=0), torch.zeros_like(area))


def box_iou_3d_official(boxes_a: torch.Tensor, boxes_b: torch.Tensor) -> torch.Tensor:
    """3D IoU of official boxes as the old mmdet3d `LiDARInstance3DBoxes.overlaps(mode="iou")` computes it.

    BEV: the exact rotated overlap. Height: the overlap of [z, z + h] (the official code treats z as the
    bottom; with the z quirk that is the true centre, kept here for identical costs). IoU =
    overlap_bev · overlap_h / clamp(vol_a + vol_b - overlap, 1e-8).

    Args:
        boxes_a: (N, 7+) official boxes. boxes_b: (M, 7+).
    Returns:
        (N, M) in boxes_a's dtype.
    """
    bev = rotated_bev_overlap(official_to_internal_torch(boxes_a[:, :7].double()),
                              official_to_internal_torch(boxes_b[:, :7].double()))
    za, ha = boxes_a[:, 2, None].double(), boxes_a[:, 5, None].double()
    zb, hb = boxes_b[None, :, 2].double(), boxes_b[None, :, 5].double()
    overlap_h = (torch.minimum(za + ha, zb + hb) - torch.maximum(za, zb)).clamp(min=0)
    inter = bev * overlap_h
    vol_a = (boxes_a[:, 3] * boxes_a[:, 4] * boxes_a[:, 5]).double()[:, None]
    vol_b = (boxes_b[:, 3] * boxes_b[:, 4] * boxes_b[:, 5]).double()[None]
    return (inter / (vol_a + vol_b - inter).clamp(min=1e-8)).to(boxes_a.dtype)


# ---------------------------------------------------------------------------------------------- assigner
class FocalLossCost:
    """Classification cost from sigmoid focal terms (mmdet `FocalLossCost`), times `weight`.

    cost[i, j] = alpha (1-p)^gamma (-log(p + eps)) - (1-alpha) p^gamma (-log(1 - p + eps)),
    p = sigmoid(logit[i, label_j]), eps 1e-12.
    """

    def __init__(self, weight: float = 1.0, alpha: float = 0.25, gamma: float = 2.0, eps: float = 1e-12):
        self.weight, self.alpha, self.gamma, self.eps = float(weight), float(alpha), float(gamma), eps

    def __call__(self, cls_pred: torch.Tensor, gt_labels: torch.Tensor) -> torch.Tensor:
        """cls_pred (P, C) logits, gt_labels (M,) → (P, M)."""
        p = cls_pred.sigmoid()
        neg = -(1 - p + self.eps).log() * (1 - self.alpha) * p.pow(self.gamma)
        pos = -(p + self.eps).log() * self.alpha * (1 - p).pow(self.gamma)
        return (pos[:, gt_labels] - neg[:, gt_labels]) * self.weight


class BBoxBEVL1Cost:
    """L1 distance of BEV centres normalised by the point-cloud range to [0, 1], times `weight`."""

    def __init__(self, weight: float = 1.0):
        self.weight = float(weight)

    def __call__(self, bboxes: torch.Tensor, gt_bboxes: torch.Tensor, train_cfg: Mapping[str, Any]) -> torch.Tensor:
        pcr = train_cfg["point_cloud_range"]
        start = bboxes.new_tensor([pcr[0], pcr[1]])
        size = bboxes.new_tensor([pcr[3] - pcr[0], pcr[4] - pcr[1]])
        a = (bboxes[:, :2] - start) / size
        b = (gt_bboxes[:, :2] - start) / size
        return torch.cdist(a, b, p=1) * self.weight


class IoU3DCost:
    """-IoU, times `weight`."""

    def __init__(self, weight: float = 1.0):
        self.weight = float(weight)

    def __call__(self, iou: torch.Tensor) -> torch.Tensor:
        return -iou * self.weight


class BboxOverlaps3D:
    """3D IoU calculator (official `BboxOverlaps3D`, coordinate "lidar" only) on official boxes."""

    def __init__(self, coordinate: str = "lidar"):
        if coordinate != "lidar":
            raise ValueError(f"BboxOverlaps3D: only coordinate 'lidar' is supported, got {coordinate!r}")
        self.coordinate = coordinate

    def __call__(self, bboxes1: torch.Tensor, bboxes2: torch.Tensor) -> torch.Tensor:
        return box_iou_3d_official(bboxes1, bboxes2)


_COSTS = {"FocalLossCost": FocalLossCost, "BBoxBEVL1Cost": BBoxBEVL1Cost, "IoU3DCost": IoU3DCost,
          "BboxOverlaps3D": BboxOverlaps3D}


def _build(cfg: Any, default: Mapping[str, Any], path: str):
    if cfg is None:
        cfg = default
    if not isinstance(cfg, Mapping):
        return cfg  # already an object
    kwargs = dict(cfg)
    name = kwargs.pop("type", None)
    if name not in _COSTS:
        raise ValueError(f"{path}: unknown type {name!r} (expected one of {', '.join(_COSTS)})")
    return _COSTS[name](**kwargs)


class AssignResult:
    """Assignment of predictions to GTs (mmdet layout).

    gt_inds: (P,) long, 0 = background, k ≥ 1 = GT k-1. max_overlaps: (P,) IoU with the matched GT (0 for
    background). labels: (P,) GT label of positives, -1 elsewhere.
    """

    def __init__(self, num_gts: int, gt_inds: torch.Tensor, max_overlaps: torch.Tensor, labels: torch.Tensor):
        self.num_gts, self.gt_inds, self.max_overlaps, self.labels = num_gts, gt_inds, max_overlaps, labels

    @property
    def pos_inds(self) -> torch.Tensor:
        return torch.nonzero(self.gt_inds > 0, as_tuple=False).flatten()

    @property
    def neg_inds(self) -> torch.Tensor:
        return torch.nonzero(self.gt_inds == 0, as_tuple=False).flatten()


class HungarianAssigner3D:
    """One-to-one matching of queries to GT boxes by minimum total cost (official `HungarianAssigner3D`).

    cost = cls_cost(logits, labels) + reg_cost(BEV centres) + iou_cost(3D IoU), solved with scipy's
    `linear_sum_assignment` on the CPU. Every GT gets exactly one query when there are at least as many
    queries as GTs; unmatched queries are background. No cost gating.

    Args:
        cls_cost, reg_cost, iou_cost, iou_calculator: `{type: ..., ...}` configs (official names) or objects.
    """

    def __init__(self, cls_cost: Any = None, reg_cost: Any = None, iou_cost: Any = None, iou_calculator: Any = None):
        self.cls_cost = _build(cls_cost, {"type": "FocalLossCost", "weight": 0.15}, "assigner.cls_cost")
        self.reg_cost = _build(reg_cost, {"type": "BBoxBEVL1Cost", "weight": 0.25}, "assigner.reg_cost")
        self.iou_cost = _build(iou_cost, {"type": "IoU3DCost", "weight": 0.25}, "assigner.iou_cost")
        self.iou_calculator = _build(iou_calculator, {"type": "BboxOverlaps3D"}, "assigner.iou_calculator")

    def cost_matrix(self, bboxes: torch.Tensor, gt_bboxes: torch.Tensor, gt_labels: torch.Tensor,
                    cls_pred: torch.Tensor, train_cfg: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """(P, M) total cost and (P, M) IoU. cls_pred is (P, C) logits."""
        iou = self.iou_calculator(bboxes, gt_bboxes)
        cost = self.cls_cost(cls_pred, gt_labels) + self.reg_cost(bboxes, gt_bboxes, train_cfg) + self.iou_cost(iou)
        return cost, iou

    def assign(self, bboxes: torch.Tensor, gt_bboxes: torch.Tensor, gt_labels: torch.Tensor, cls_pred: torch.Tensor,
               train_cfg: Mapping[str, Any]) -> AssignResult:
        """Args:
            bboxes: (P, 7+) decoded official prediction boxes. gt_bboxes: (M, 7+) official GT boxes.
            gt_labels: (M,) long. cls_pred: (P, C) logits (the official code passes (1, C, P)[0].T).
        """
        num_gts, num_preds = gt_bboxes.shape[0], bboxes.shape[0]
        gt_inds = torch.zeros(num_preds, dtype=torch.long, device=bboxes.device)
        labels = torch.full((num_preds,), -1, dtype=torch.long, device=bboxes.device)
        overlaps = bboxes.new_zeros(num_preds)
        if num_gts == 0 or num_preds == 0:
            return AssignResult(num_gts, gt_inds, overlaps, labels)
        cost, iou = self.cost_matrix(bboxes, gt_bboxes, gt_labels, cls_pred, train_cfg)
        from scipy.optimize import linear_sum_assignment  # training only: the model imports without scipy

        rows, cols = linear_sum_assignment(cost.detach().cpu().double().numpy())
        rows = torch.from_numpy(rows).to(bboxes.device)
        cols = torch.from_numpy(cols).to(bboxes.device)
        gt_inds[rows] = cols + 1
        labels[rows] = gt_labels[cols]
        overlaps[rows] = iou[rows, cols].to(overlaps.dtype)
        return AssignResult(num_gts, gt_inds, overlaps, labels)


# ---------------------------------------------------------------------------------------------- heatmaps
def gaussian_radius(det_size: Sequence[float], min_overlap: float = 0.5) -> float:
    """CenterPoint's radius: the smallest of the three CornerNet cases for a (height, width) box in cells.

    (The CenterPoint/mmdet3d form divides each root by 2, not 2a; kept for identical targets.)
    """
    height, width = float(det_size[0]), float(det_size[1])
    a1, b1 = 1.0, height + width
    c1 = width * height * (1 - min_overlap) / (1 + min_overlap)
    r1 = (b1 + math.sqrt(b1 ** 2 - 4 * a1 * c1)) / 2
    a2, b2 = 4.0, 2 * (height + width)
    c2 = (1 - min_overlap) * width * height
    r2 = (b2 + math.sqrt(b2 ** 2 - 4 * a2 * c2)) / 2
    a3, b3 = 4 * min_overlap, -2 * min_overlap * (height + width)
    c3 = (min_overlap - 1) * width * height
    r3 = (b3 + math.sqrt(b3 ** 2 - 4 * a3 * c3)) / 2
    return min(r1, r2, r3)


def gaussian_2d(shape: Sequence[int], sigma: float = 1.0) -> np.ndarray:
    """Unnormalised (h, w) Gaussian centred in the array; values below eps · max are zeroed (float64)."""
    m, n = [(s - 1.0) / 2.0 for s in shape]
    y, x = np.ogrid[-m:m + 1, -n:n + 1]
    g = np.exp(-(x * x + y * y) / (2 * sigma * sigma))
    g[g < np.finfo(g.dtype).eps * g.max()] = 0
    return g


def draw_heatmap_gaussian(heatmap: torch.Tensor, center: Sequence[int], radius: int, k: float = 1.0) -> torch.Tensor:
    """Max a (2r+1)² Gaussian (sigma = (2r+1)/6) into `heatmap` in place, clipped at the borders.

    Args:
        heatmap: (H, W). center: integer (col, row) — CenterPoint's (x, y) order: `center[0]` indexes the
            last axis. radius: int ≥ 0. k: peak value.
    Returns:
        `heatmap` (modified in place).
    """
    radius = int(radius)
    diameter = 2 * radius + 1
    gaussian = torch.from_numpy(gaussian_2d((diameter, diameter), sigma=diameter / 6))
    x, y = int(center[0]), int(center[1])
    height, width = heatmap.shape[:2]
    left, right = min(x, radius), min(width - x, radius + 1)
    top, bottom = min(y, radius), min(height - y, radius + 1)
    masked = heatmap[y - top:y + bottom, x - left:x + right]
    g = gaussian[radius - top:radius + bottom, radius - left:radius + right].to(heatmap)
    if min(g.shape) > 0 and min(masked.shape) > 0:
        torch.max(masked, g * k, out=masked)
    return heatmap


# ---------------------------------------------------------------------------------------------- NMS
def circle_nms(centres: np.ndarray, scores: np.ndarray, thresh: float, post_max_size: int = 83) -> list[int]:
    """Greedy NMS by centre distance (CenterPoint): suppress j when squared distance to a kept i ≤ thresh.

    Returns kept indices, highest score first, at most post_max_size.
    """
    order = np.argsort(-scores, kind="stable")
    suppressed = np.zeros(len(scores), dtype=bool)
    keep: list[int] = []
    for a, i in enumerate(order):
        if suppressed[i]:
            continue
        keep.append(int(i))
        d = ((centres[order[a + 1:]] - centres[i]) ** 2).sum(-1)
        suppressed[order[a + 1:][d <= thresh]] = True
    return keep[:post_max_size]


def rotated_nms(boxes: torch.Tensor, scores: torch.Tensor, thresh: float, pre_max_size: int | None = None,
                post_max_size: int | None = None) -> torch.Tensor:
    """Greedy NMS on rotated BEV boxes (old mmdet3d `nms_gpu` semantics).

    Args:
        boxes: (N, 7+) internal boxes (only x, y, dx, dy, yaw are used). scores: (N,).
        thresh: a box is suppressed when its BEV IoU with a kept, higher-scoring box is > thresh.
    Returns:
        (K,) long indices into `boxes`, highest score first.
    """
    order = torch.sort(scores, descending=True, stable=True)[1]
    if pre_max_size is not None:
        order = order[:pre_max_size]
    if len(order) == 0:
        return order
    b = boxes[order].double()
    overlap = rotated_bev_overlap(b, b)
    area = (b[:, 3] * b[:, 4]).clamp(min=0)
    iou = (overlap / (area[:, None] + area[None] - overlap).clamp(min=1e-8)).cpu().numpy()
    suppressed = np.zeros(len(order), dtype=bool)
    keep = []
    for i in range(len(order)):
        if suppressed[i]:
            continue
        keep.append(i)
        suppressed[i + 1:] |= iou[i, i + 1:] > thresh
    out = order[torch.as_tensor(keep, dtype=torch.long, device=order.device)]
    return out[:post_max_size] if post_max_size is not None else out
