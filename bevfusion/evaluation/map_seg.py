"""BEV map segmentation IoU, as the official evaluation computes it (facts §5.3).

TP/FP/FN are accumulated over the whole set per (class, threshold); a cell is predicted positive when
its probability ≥ threshold; IoU = TP / (TP + FP + FN + 1e-7). Each class reports its IoU at every
threshold and its best one (`iou@max`); mIoU is the mean of the per-class best.
"""
from __future__ import annotations

from typing import Sequence

import torch

__all__ = ["THRESHOLDS", "MapIoU"]

THRESHOLDS = (0.35, 0.40, 0.45, 0.50, 0.55, 0.60, 0.65)


class MapIoU:
    """Streaming accumulator: `update(probs, gt)` per batch, `compute()` at the end (also after DDP
    reduction of `.stats`, a (C, T, 3) int64 tensor of TP, FP, FN)."""

    def __init__(self, classes: Sequence[str], thresholds: Sequence[float] = THRESHOLDS):
        self.classes = list(classes)
        self.thresholds = torch.tensor(thresholds, dtype=torch.float64)
        self.stats = torch.zeros(len(self.classes), len(thresholds), 3, dtype=torch.int64)

    def update(self, probs: torch.Tensor, gt: torch.Tensor) -> None:
        """probs (B, C, H, W) or (C, H, W) in [0, 1]; gt the same shape, 0/1."""
        if probs.shape != gt.shape:
            raise ValueError(f"prediction shape {tuple(probs.shape)} != ground truth {tuple(gt.shape)}")
        if probs.shape[-3] != len(self.classes):
            raise ValueError(f"{probs.shape[-3]} channels for {len(self.classes)} classes")
        p = probs.detach().double().transpose(0, -3).reshape(len(self.classes), 1, -1).cpu()
        g = gt.detach().bool().transpose(0, -3).reshape(len(self.classes), 1, -1).cpu()
        pos = p >= self.thresholds.view(1, -1, 1)  # (C, T, N)
        self.stats[..., 0] += (pos & g).sum(-1)
        self.stats[..., 1] += (pos & ~g).sum(-1)
        self.stats[..., 2] += (~pos & g).sum(-1)

    def compute(self) -> dict[str, float]:
        tp, fp, fn = self.stats.double().unbind(-1)
        iou = tp / (tp + fp + fn + 1e-7)  # (C, T)
        out: dict[str, float] = {}
        for c, name in enumerate(self.classes):
            for t, th in enumerate(self.thresholds.tolist()):
                out[f"map/{name}/iou@{th:.2f}"] = float(iou[c, t])
            out[f"map/{name}/iou@max"] = float(iou[c].max())
        out["map/mean/iou@max"] = float(iou.max(dim=1).values.mean())
        return out
