"""Map IoU against a hand-computed case."""
from __future__ import annotations

import pytest
import torch

from bevfusion.evaluation.map_seg import MapIoU


def test_hand_computed_iou():
    # One class, 2x3 cells, two batches. Probabilities and truth chosen so that at threshold 0.5:
    # batch 0: TP 2 (0.9, 0.6), FP 1 (0.7), FN 1 (0.2); batch 1: TP 1 (0.55), FP 0, FN 1 (0.45).
    probs = torch.tensor([[[[0.9, 0.6, 0.7], [0.2, 0.1, 0.0]]], [[[0.55, 0.45, 0.3], [0.1, 0.0, 0.0]]]])
    gt = torch.tensor([[[[1, 1, 0], [1, 0, 0]]], [[[1, 1, 0], [0, 0, 0]]]])
    metric = MapIoU(["divider"], thresholds=(0.5, 0.65))
    metric.update(probs[:1], gt[:1])
    metric.update(probs[1], gt[1])  # a single sample (C, H, W) works too
    out = metric.compute()
    assert out["map/divider/iou@0.50"] == pytest.approx(3 / (3 + 1 + 2), abs=1e-6)
    # At 0.65: TP 1 (0.9), FP 1 (0.7), FN 4.
    assert out["map/divider/iou@0.65"] == pytest.approx(1 / (1 + 1 + 4), abs=1e-6)
    assert out["map/divider/iou@max"] == pytest.approx(0.5, abs=1e-6)
    assert out["map/mean/iou@max"] == pytest.approx(0.5, abs=1e-6)


def test_mean_takes_each_class_best_threshold():
    probs = torch.zeros(1, 2, 1, 2)
    probs[0, 0] = torch.tensor([0.4, 0.1])  # class a: positive only at 0.35
    probs[0, 1] = torch.tensor([0.9, 0.1])  # class b: positive at every threshold
    gt = torch.tensor([[[[1, 0]], [[1, 0]]]])
    metric = MapIoU(["a", "b"])
    metric.update(probs, gt)
    out = metric.compute()
    assert out["map/a/iou@0.35"] == pytest.approx(1.0, abs=1e-6) and out["map/a/iou@0.65"] == 0.0
    assert out["map/mean/iou@max"] == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(ValueError, match="shape"):
        metric.update(probs, gt[..., :1])
