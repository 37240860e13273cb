"""Detection losses (mmdet semantics) against float64 formulas written out element by element."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from bevfusion.models.heads.losses import FocalLoss, GaussianFocalLoss, L1Loss, weight_reduce_loss
from bevfusion.registry import build as build_loss


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def _manual_focal(logits: np.ndarray, labels: np.ndarray, weights: np.ndarray, gamma: float, alpha: float) -> float:
    total = 0.0
    n, c = logits.shape
    for i in range(n):
        for k in range(c):
            t = 1.0 if labels[i] == k else 0.0
            p = _sigmoid(float(logits[i, k]))
            bce = -(t * math.log(p) + (1 - t) * math.log(1 - p))
            pt = (1 - p) if t else p
            a = alpha if t else 1 - alpha
            total += bce * a * pt ** gamma * weights[i]
    return total


class TestFocalLoss:
    def test_against_manual_with_background_and_avg_factor(self):
        rng = np.random.default_rng(0)
        logits = rng.normal(scale=2.0, size=(7, 4))
        labels = np.array([0, 3, 4, 4, 1, 4, 2])  # 4 == num_classes: background
        weights = np.array([1, 1, 0, 1, 2, 1, 1], dtype=np.float64)
        loss = FocalLoss(use_sigmoid=True, gamma=2.0, alpha=0.25, reduction="mean", loss_weight=1.5)
        out = loss(torch.tensor(logits), torch.tensor(labels), torch.tensor(weights), avg_factor=3)
        expected = 1.5 * _manual_focal(logits, labels, weights, 2.0, 0.25) / 3
        assert out.dtype == torch.float64
        assert out.item() == pytest.approx(expected, rel=1e-12)

    def test_mean_without_avg_factor_averages_all_elements(self):
        rng = np.random.default_rng(1)
        logits = rng.normal(size=(5, 3))
        labels = np.array([0, 1, 2, 3, 0])
        out = FocalLoss()(torch.tensor(logits), torch.tensor(labels))
        expected = _manual_focal(logits, labels, np.ones(5), 2.0, 0.25) / 15
        assert out.item() == pytest.approx(expected, rel=1e-12)

    def test_float32_close_and_gradient_flows(self):
        logits = torch.randn(6, 10, requires_grad=True)
        labels = torch.tensor([10, 10, 3, 10, 0, 9])
        out = FocalLoss()(logits, labels, torch.ones(6), avg_factor=2)
        ref = _manual_focal(logits.detach().double().numpy(), labels.numpy(), np.ones(6), 2.0, 0.25) / 2
        assert out.item() == pytest.approx(ref, rel=1e-5)
        out.backward()
        assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


class TestGaussianFocalLoss:
    def test_against_manual(self):
        rng = np.random.default_rng(2)
        pred = np.clip(rng.uniform(size=(2, 3, 5, 5)), 1e-4, 1 - 1e-4)
        target = rng.uniform(size=(2, 3, 5, 5)) * 0.9
        target[0, 1, 2, 2] = target[1, 0, 4, 0] = target[1, 2, 1, 3] = 1.0
        expected = 0.0
        for idx in np.ndindex(pred.shape):
            p, t = pred[idx], target[idx]
            if t == 1.0:
                expected += -math.log(p + 1e-12) * (1 - p) ** 2
            expected += -math.log(1 - p + 1e-12) * p ** 2 * (1 - t) ** 4
        out = GaussianFocalLoss(reduction="mean", loss_weight=1.0)(torch.tensor(pred), torch.tensor(target),
                                                                   avg_factor=3)
        assert out.item() == pytest.approx(expected / 3, rel=1e-12)
        out_mean = GaussianFocalLoss()(torch.tensor(pred), torch.tensor(target))
        assert out_mean.item() == pytest.approx(expected / pred.size, rel=1e-12)


class TestL1Loss:
    def test_against_manual_with_weights(self):
        rng = np.random.default_rng(3)
        pred, target = rng.normal(size=(2, 4, 10)), rng.normal(size=(2, 4, 10))
        weight = rng.uniform(size=(2, 4, 10))
        expected = sum(abs(pred[i] - target[i]) * weight[i] for i in np.ndindex(pred.shape))
        out = L1Loss(reduction="mean", loss_weight=0.25)(torch.tensor(pred), torch.tensor(target),
                                                        torch.tensor(weight), avg_factor=5)
        assert out.item() == pytest.approx(0.25 * expected / 5, rel=1e-12)

    def test_empty_target_gives_zero_with_graph(self):
        pred = torch.zeros(0, 10, requires_grad=True)
        out = L1Loss()(pred, torch.zeros(0, 10))
        assert out.item() == 0.0 and out.requires_grad


def test_reductions_and_builder():
    x = torch.tensor([1.0, 2.0, 3.0])
    assert weight_reduce_loss(x, reduction="sum").item() == 6.0
    assert weight_reduce_loss(x, reduction="mean").item() == 2.0
    assert torch.equal(weight_reduce_loss(x, reduction="none"), x)
    with pytest.raises(ValueError):
        weight_reduce_loss(x, reduction="sum", avg_factor=2)
    loss = build_loss({"type": "L1Loss", "reduction": "mean", "loss_weight": 0.25})
    assert isinstance(loss, L1Loss) and loss.loss_weight == 0.25
    assert isinstance(build_loss({"type": "FocalLoss", "use_sigmoid": True, "gamma": 2.0, "alpha": 0.25,
                                  "reduction": "mean", "loss_weight": 1.0}), FocalLoss)
    with pytest.raises(ValueError, match="unknown bevfusion type 'SmoothL1'"):
        build_loss({"type": "SmoothL1"})
