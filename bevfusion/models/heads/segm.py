"""BEV map segmentation head (official `BEVSegmentationHead`, mmdet3d `heads/segm/vanilla.py`).

The decoder's BEV map is resampled onto the map-label grid by `BEVGridTransform` (bilinear
`grid_sample`), then a small conv classifier predicts one logit per class and cell. Training returns
one loss per class (`<class>/focal` or `<class>/xent`); eval returns sigmoid probabilities.
Axes follow the official [B, C, X, Y] convention: x on the height axis, y on the width axis.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from bevfusion.models.heads.losses import weight_reduce_loss

__all__ = ["BEVGridTransform", "BEVSegmentationHead", "sigmoid_focal_loss", "sigmoid_xent_loss"]


def sigmoid_xent_loss(inputs: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Binary cross-entropy on logits, computed in fp32."""
    return F.binary_cross_entropy_with_logits(inputs.float(), targets.float(), reduction=reduction)


def sigmoid_focal_loss(inputs: torch.Tensor, targets: torch.Tensor, alpha: float = -1.0, gamma: float = 2.0,
                       reduction: str = "mean") -> torch.Tensor:
    """Sigmoid focal loss (RetinaNet form) on logits, in fp32.

    loss = BCE(x, t) · (1 − p_t)^γ with p_t = p·t + (1 − p)(1 − t); with α ≥ 0 it is also weighted by
    α·t + (1 − α)(1 − t). The map head uses γ 2 and no α (α = −1), averaged over every element.
    """
    inputs, targets = inputs.float(), targets.float()
    p = torch.sigmoid(inputs)
    ce = F.binary_cross_entropy_with_logits(inputs, targets, reduction="none")
    p_t = p * targets + (1 - p) * (1 - targets)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    return weight_reduce_loss(loss, reduction=reduction)


class BEVGridTransform(nn.Module):
    """Resample a BEV map from `input_scope` to the cell centres of `output_scope` (no parameters).

    Args:
        input_scope: [[xmin, xmax, step], [ymin, ymax, step]] covered by the input map (only min, max used).
        output_scope: [[xmin, xmax, step], [ymin, ymax, step]] of the output grid; sample points are the
            cell centres min + step/2, min + 3·step/2, ... < max.
        prescale_factor: optional bilinear pre-scaling of the input (official option, default 1).

    Forward: (B, C, X_in, Y_in) → (B, C, X_out, Y_out). Bilinear, align_corners false, zeros outside.
    """

    def __init__(self, input_scope: Sequence[Sequence[float]], output_scope: Sequence[Sequence[float]],
                 prescale_factor: float = 1):
        super().__init__()
        self.input_scope = [list(s) for s in input_scope]
        self.output_scope = [list(s) for s in output_scope]
        self.prescale_factor = prescale_factor

    def grid(self, batch_size: int, device: torch.device | None = None) -> torch.Tensor:
        """(B, X_out, Y_out, 2) sampling grid; last axis (y, x) normalised to [-1, 1] as grid_sample wants."""
        coords = []
        for (imin, imax, _), (omin, omax, ostep) in zip(self.input_scope, self.output_scope):
            v = torch.arange(omin + ostep / 2, omax, ostep)  # default dtype (fp32), as upstream
            coords.append(((v - imin) / (imax - imin) * 2 - 1).to(device))
        u, v = torch.meshgrid(coords[0], coords[1], indexing="ij")  # u: x (rows), v: y (columns)
        return torch.stack([v, u], dim=-1).unsqueeze(0).expand(batch_size, -1, -1, -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.prescale_factor != 1:
            x = F.interpolate(x, scale_factor=self.prescale_factor, mode="bilinear", align_corners=False)
        grid = self.grid(x.shape[0], x.device).to(x.dtype)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


class BEVSegmentationHead(nn.Module):
    """Official `BEVSegmentationHead`: grid transform → classifier → per-class losses or probabilities.

    `classifier` = 3×3 conv (no bias) → BN → ReLU → 3×3 conv (no bias) → BN → ReLU → 1×1 conv (bias) to
    one logit per class (keys `classifier.{0,1,3,4,6}`).

    Args:
        in_channels: decoder channels (512 fusion / LiDAR, 256 camera).
        grid_transform: {input_scope, output_scope[, prescale_factor]} for BEVGridTransform.
        classes: map class names, in label-channel order.
        loss: "focal" (sigmoid focal, γ 2, no α) or "xent" (BCE).

    Forward: x (B, C, X, Y) or a list/tuple whose first element is it; `target` (B, len(classes), X', Y')
    0/1 masks on the output grid. Training → {"<class>/<loss>": scalar}; eval → sigmoid probabilities
    (B, len(classes), X', Y').
    """

    def __init__(self, in_channels: int, grid_transform: dict, classes: Sequence[str], loss: str = "focal"):
        super().__init__()
        if loss not in ("focal", "xent"):
            raise ValueError(f"BEVSegmentationHead: unknown loss {loss!r} (expected focal or xent)")
        self.in_channels, self.classes, self.loss = in_channels, list(classes), loss
        self.transform = BEVGridTransform(**grid_transform)
        self.classifier = nn.Sequential(
            nn.Conv2d(in_channels, in_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(in_channels), nn.ReLU(True),
            nn.Conv2d(in_channels, in_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(in_channels), nn.ReLU(True),
            nn.Conv2d(in_channels, len(self.classes), 1),
        )

    def forward(self, x: torch.Tensor | Sequence[torch.Tensor], target: torch.Tensor | None = None):
        if isinstance(x, (list, tuple)):
            x = x[0]
        x = self.classifier(self.transform(x))
        if not self.training:
            return torch.sigmoid(x)
        if target is None:
            raise ValueError("BEVSegmentationHead: training needs the target masks (gt_masks_bev)")
        if target.shape[1] != len(self.classes) or target.shape[-2:] != x.shape[-2:]:
            raise ValueError(f"BEVSegmentationHead: target shape {tuple(target.shape)} does not fit the "
                             f"prediction {tuple(x.shape)}")
        fn = sigmoid_focal_loss if self.loss == "focal" else sigmoid_xent_loss
        return {f"{name}/{self.loss}": fn(x[:, k], target[:, k]) for k, name in enumerate(self.classes)}
