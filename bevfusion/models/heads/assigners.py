"""TransFusion's Hungarian assigner with the official costs and 3D IoU (official `HungarianAssigner3D`).

Boxes here are in the **official** (old mmdet3d) layout, as the head hands them over (see
`bevfusion.models.heads.coders`): (x, y, z, w, l, h, yaw_mm[, vx, vy]) with z the value the official code
calls the box bottom, so the 3D IoU uses the vertical extent [z, z + h] as upstream does.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch

from bevfusion.ops.boxes import rotated_intersection_bev
from bevfusion.registry import built
from bevfusion.structures.boxes import official_to_internal

__all__ = ["HungarianAssigner3D", "AssignResult", "FocalLossCost", "BBoxBEVL1Cost", "IoU3DCost", "BboxOverlaps3D",
           "box_iou_3d_official"]


def box_iou_3d_official(boxes_a: torch.Tensor, boxes_b: torch.Tensor, impl: str = "auto") -> torch.Tensor:
    """3D IoU of official boxes as the old mmdet3d `LiDARInstance3DBoxes.overlaps(mode="iou")` computes it.

    BEV: the exact rotated intersection area (`bevfusion.ops.boxes.rotated_intersection_bev` on the boxes
    converted to the internal convention, in float64). Height: the overlap of [z, z + h] (the official code
    treats z as the bottom; with the z quirk that is the true centre, kept here for identical costs).
    IoU = overlap_bev · overlap_h / clamp(vol_a + vol_b - overlap, 1e-8).

    Args:
        boxes_a: (N, 7+) official boxes. boxes_b: (M, 7+), same device.
        impl: passed to the box op ("auto", "reference", "cpu", "triton").
    Returns:
        (N, M) in boxes_a's dtype.
    """
    bev = rotated_intersection_bev(official_to_internal(boxes_a[:, :7].double()),
                                   official_to_internal(boxes_b[:, :7].double()), impl=impl)
    za, ha = boxes_a[:, 2, None].double(), boxes_a[:, 5, None].double()
    zb, hb = boxes_b[None, :, 2].double(), boxes_b[None, :, 5].double()
    overlap_h = (torch.minimum(za + ha, zb + hb) - torch.maximum(za, zb)).clamp(min=0)
    inter = bev * overlap_h
    vol_a = (boxes_a[:, 3] * boxes_a[:, 4] * boxes_a[:, 5]).double()[:, None]
    vol_b = (boxes_b[:, 3] * boxes_b[:, 4] * boxes_b[:, 5]).double()[None]
    return (inter / (vol_a + vol_b - inter).clamp(min=1e-8)).to(boxes_a.dtype)


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

    def __call__(self, bboxes: torch.Tensor, gt_bboxes: torch.Tensor, point_cloud_range: Sequence[float]
                 ) -> torch.Tensor:
        """point_cloud_range: (x0, y0, z0, x1, y1, z1) (upstream passes the whole train_cfg)."""
        pcr = point_cloud_range
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
        cls_cost, reg_cost, iou_cost, iou_calculator: the cost objects (or their `{type: ..., ...}` configs, built
            through the registry; default the official ones).
    """

    def __init__(self, cls_cost: Any = None, reg_cost: Any = None, iou_cost: Any = None, iou_calculator: Any = None):
        self.cls_cost = built(cls_cost, "cls_cost", {"type": "FocalLossCost", "weight": 0.15}, FocalLossCost)
        self.reg_cost = built(reg_cost, "reg_cost", {"type": "BBoxBEVL1Cost", "weight": 0.25}, BBoxBEVL1Cost)
        self.iou_cost = built(iou_cost, "iou_cost", {"type": "IoU3DCost", "weight": 0.25}, IoU3DCost)
        self.iou_calculator = built(iou_calculator, "iou_calculator", {"type": "BboxOverlaps3D"}, BboxOverlaps3D)

    def cost_matrix(self, bboxes: torch.Tensor, gt_bboxes: torch.Tensor, gt_labels: torch.Tensor,
                    cls_pred: torch.Tensor, point_cloud_range: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor]:
        """(P, M) total cost and (P, M) IoU. cls_pred is (P, C) logits."""
        iou = self.iou_calculator(bboxes, gt_bboxes)
        cost = (self.cls_cost(cls_pred, gt_labels) + self.reg_cost(bboxes, gt_bboxes, point_cloud_range)
                + self.iou_cost(iou))
        return cost, iou

    def assign(self, bboxes: torch.Tensor, gt_bboxes: torch.Tensor, gt_labels: torch.Tensor, cls_pred: torch.Tensor,
               point_cloud_range: Sequence[float]) -> AssignResult:
        """Args:
            bboxes: (P, 7+) decoded official prediction boxes. gt_bboxes: (M, 7+) official GT boxes.
            gt_labels: (M,) long. cls_pred: (P, C) logits (the official code passes (1, C, P)[0].T).
            point_cloud_range: (x0, y0, z0, x1, y1, z1) of the BEV L1 cost (upstream passes its train_cfg).
        """
        num_gts, num_preds = gt_bboxes.shape[0], bboxes.shape[0]
        gt_inds = torch.zeros(num_preds, dtype=torch.long, device=bboxes.device)
        labels = torch.full((num_preds,), -1, dtype=torch.long, device=bboxes.device)
        overlaps = bboxes.new_zeros(num_preds)
        if num_gts == 0 or num_preds == 0:
            return AssignResult(num_gts, gt_inds, overlaps, labels)
        cost, iou = self.cost_matrix(bboxes, gt_bboxes, gt_labels, cls_pred, point_cloud_range)
        from scipy.optimize import linear_sum_assignment  # training only: the model imports without scipy

        rows, cols = linear_sum_assignment(cost.detach().cpu().double().numpy())
        rows = torch.from_numpy(rows).to(bboxes.device)
        cols = torch.from_numpy(cols).to(bboxes.device)
        gt_inds[rows] = cols + 1
        labels[rows] = gt_labels[cols]
        overlaps[rows] = iou[rows, cols].to(overlaps.dtype)
        return AssignResult(num_gts, gt_inds, overlaps, labels)
