"""Detection losses with mmdet 2.20 semantics (official `type` names): FocalLoss, GaussianFocalLoss, L1Loss.

Every loss is elementwise, then multiplied by an optional `weight` (broadcast as mmdet does), then
reduced:
    avg_factor given, reduction "mean" → sum / avg_factor (mmdet 2.20 adds no epsilon);
    avg_factor None → "mean" averages over all elements, "sum" sums, "none" returns the tensor;
and finally multiplied by `loss_weight`. `reduction_override` replaces the configured reduction.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["FocalLoss", "GaussianFocalLoss", "L1Loss", "weight_reduce_loss"]


def weight_reduce_loss(loss: torch.Tensor, weight: torch.Tensor | None = None, reduction: str = "mean",
                       avg_factor: float | torch.Tensor | None = None) -> torch.Tensor:
    """Apply an elementwise weight, then reduce (mmdet `weight_reduce_loss`)."""
    if weight is not None:
        loss = loss * weight
    if avg_factor is None:
        if reduction == "mean":
            return loss.mean()
        if reduction == "sum":
            return loss.sum()
        if reduction == "none":
            return loss
        raise ValueError(f"unknown reduction {reduction!r} (expected none, mean or sum)")
    if reduction == "mean":
        return loss.sum() / avg_factor
    if reduction == "none":
        return loss
    raise ValueError("avg_factor can only be used with reduction 'mean' or 'none'")


def _check_reduction(reduction: str) -> str:
    if reduction not in ("none", "mean", "sum"):
        raise ValueError(f"unknown reduction {reduction!r} (expected none, mean or sum)")
    return reduction


class FocalLoss(nn.Module):
    """Sigmoid focal loss over class logits (mmdet `FocalLoss`, use_sigmoid only).

    Args:
        use_sigmoid: must be True (the softmax variant is not implemented upstream either).
        gamma, alpha: focal parameters; alpha weighs positives, 1 - alpha negatives.
        reduction, loss_weight: see the module docstring.

    Call:
        pred: (N, C) logits. target: (N,) int labels in [0, C]; C means background (all-zero row).
        weight: None, (N,) per-sample or (N, C) per-element.
    """

    def __init__(self, use_sigmoid: bool = True, gamma: float = 2.0, alpha: float = 0.25, reduction: str = "mean",
                 loss_weight: float = 1.0):
        super().__init__()
        if not use_sigmoid:
            raise ValueError("FocalLoss: only use_sigmoid=True is supported")
        self.use_sigmoid, self.gamma, self.alpha = use_sigmoid, float(gamma), float(alpha)
        self.reduction, self.loss_weight = _check_reduction(reduction), float(loss_weight)

    def forward(self, pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None,
                avg_factor: float | None = None, reduction_override: str | None = None) -> torch.Tensor:
        reduction = _check_reduction(reduction_override or self.reduction)
        num_classes = pred.shape[1]
        if target.dim() == 1:  # labels → one-hot, background (label == C) becomes an all-zero row
            target = F.one_hot(target.long(), num_classes + 1)[:, :num_classes]
        target = target.type_as(pred)
        prob = pred.sigmoid()
        pt = (1 - prob) * target + prob * (1 - target)
        focal_weight = (self.alpha * target + (1 - self.alpha) * (1 - target)) * pt.pow(self.gamma)
        loss = F.binary_cross_entropy_with_logits(pred, target, reduction="none") * focal_weight
        if weight is not None:
            weight = weight.to(loss.dtype)
            if weight.shape != loss.shape and weight.numel() == loss.shape[0]:
                weight = weight.view(-1, 1)
        return self.loss_weight * weight_reduce_loss(loss, weight, reduction, avg_factor)


class GaussianFocalLoss(nn.Module):
    """CenterNet-style focal loss against a Gaussian heatmap (mmdet `GaussianFocalLoss`).

    loss = -log(p) (1-p)^alpha [t == 1]  -  log(1-p) p^alpha (1-t)^gamma, with eps 1e-12 in the logs.
    `pred` are probabilities (already sigmoided and clipped by the caller), `target` in [0, 1].
    """

    def __init__(self, alpha: float = 2.0, gamma: float = 4.0, reduction: str = "mean", loss_weight: float = 1.0):
        super().__init__()
        self.alpha, self.gamma = float(alpha), float(gamma)
        self.reduction, self.loss_weight = _check_reduction(reduction), float(loss_weight)

    def forward(self, pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None,
                avg_factor: float | None = None, reduction_override: str | None = None) -> torch.Tensor:
        reduction = _check_reduction(reduction_override or self.reduction)
        eps = 1e-12
        pos = target.eq(1).to(pred.dtype)
        neg_weights = (1 - target).pow(self.gamma)
        pos_loss = -(pred + eps).log() * (1 - pred).pow(self.alpha) * pos
        neg_loss = -(1 - pred + eps).log() * pred.pow(self.alpha) * neg_weights
        return self.loss_weight * weight_reduce_loss(pos_loss + neg_loss, weight, reduction, avg_factor)


class L1Loss(nn.Module):
    """Elementwise |pred - target| (mmdet `L1Loss`); an empty target gives a zero that keeps the graph."""

    def __init__(self, reduction: str = "mean", loss_weight: float = 1.0):
        super().__init__()
        self.reduction, self.loss_weight = _check_reduction(reduction), float(loss_weight)

    def forward(self, pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None,
                avg_factor: float | None = None, reduction_override: str | None = None) -> torch.Tensor:
        reduction = _check_reduction(reduction_override or self.reduction)
        if target.numel() == 0:
            return pred.sum() * 0
        loss = (pred - target).abs()
        return self.loss_weight * weight_reduce_loss(loss, weight, reduction, avg_factor)
