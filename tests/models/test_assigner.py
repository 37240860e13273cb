"""Hungarian assigner, its official costs and the 3D IoU behind the IoU cost, on hand-made cases."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from bevfusion.models.heads.assigners import (BBoxBEVL1Cost, FocalLossCost, HungarianAssigner3D, IoU3DCost,
                                             box_iou_3d_official)
from bevfusion.ops.boxes import box_corners_bev, rotated_intersection_bev
from bevfusion.structures.boxes import official_to_internal
from bevfusion.structures.boxes import points_in_boxes_np

PC_RANGE = [-50.0, -50.0, -5.0, 50.0, 50.0, 3.0]
OFFICIAL_COSTS = dict(cls_cost={"type": "FocalLossCost", "gamma": 2.0, "alpha": 0.25, "weight": 0.15},
                      reg_cost={"type": "BBoxBEVL1Cost", "weight": 0.25},
                      iou_cost={"type": "IoU3DCost", "weight": 0.25},
                      iou_calculator={"type": "BboxOverlaps3D", "coordinate": "lidar"})


def _box(x, y, z=0.0, w=1.0, l=1.0, h=1.0, yaw=0.0):  # official layout, 9 values
    return [x, y, z, w, l, h, yaw, 0.0, 0.0]


def _focal_cost(logit: float, alpha=0.25, gamma=2.0, eps=1e-12) -> float:
    p = 1 / (1 + math.exp(-logit))
    return alpha * (1 - p) ** gamma * -math.log(p + eps) - (1 - alpha) * p ** gamma * -math.log(1 - p + eps)


class TestCosts:
    def test_focal_cost_by_hand(self):
        logits = torch.tensor([[2.0, -1.0, 0.5], [-3.0, 0.0, 1.0]], dtype=torch.float64)
        labels = torch.tensor([2, 0, 2])
        cost = FocalLossCost(weight=0.15)(logits, labels)
        expected = [[0.15 * _focal_cost(float(logits[i, c])) for c in labels] for i in range(2)]
        np.testing.assert_allclose(cost.numpy(), expected, rtol=1e-12)

    def test_bev_l1_cost_by_hand(self):
        preds = torch.tensor([_box(10, -20), _box(0, 0)], dtype=torch.float64)
        gts = torch.tensor([_box(-10, 5)], dtype=torch.float64)
        cost = BBoxBEVL1Cost(weight=0.25)(preds, gts, PC_RANGE)
        np.testing.assert_allclose(cost.numpy(), [[0.25 * (20 + 25) / 100], [0.25 * (10 + 5) / 100]], rtol=1e-12)

    def test_iou_cost(self):
        assert IoU3DCost(weight=0.25)(torch.tensor([[0.5]])).item() == -0.125


class TestIoU:
    def test_axis_aligned_by_hand(self):
        gt = torch.tensor([_box(0, 0, 0, w=2, l=4, h=2)], dtype=torch.float64)
        preds = torch.tensor([
            _box(1, 0, 0, w=2, l=4, h=2),   # x overlap 1 × y 4 × z 2 = 8; union 24
            _box(0, 0, 1, w=2, l=4, h=1),   # official z is the bottom: [1, 2] ∩ [0, 2] = 1 → 8 / (16 + 8 - 8)
            _box(5, 0, 0, w=2, l=4, h=2),   # disjoint
            _box(0, 0, 0, w=2, l=4, h=2),   # identical
        ], dtype=torch.float64)
        iou = box_iou_3d_official(preds, gt)[:, 0]
        np.testing.assert_allclose(iou.numpy(), [1 / 3, 8 / 16, 0.0, 1.0], rtol=1e-9, atol=1e-12)

    def test_rotated_square_octagon(self):
        a = torch.tensor([[0, 0, 0, 1, 1, 1, 0.0]], dtype=torch.float64)
        b = torch.tensor([[0, 0, 0, 1, 1, 1, math.pi / 4]], dtype=torch.float64)
        assert rotated_intersection_bev(a, b).item() == pytest.approx(2 * (math.sqrt(2) - 1), rel=1e-9)

    def test_official_yaw_geometry(self):
        """Old mmdet3d corners: (±w/2, ±l/2) rotated clockwise by yaw_mm. Our conversion gives the same set."""
        box = torch.tensor([[3.0, -2.0, 0.0, 1.5, 4.0, 1.0, 0.7]], dtype=torch.float64)
        x, y, _, w, l, _, yaw = box[0, :7].tolist()
        c, s = math.cos(yaw), math.sin(yaw)
        official = [(x + u * c + v * s, y - u * s + v * c) for u in (-w / 2, w / 2) for v in (-l / 2, l / 2)]
        internal = official_to_internal(box)
        ours = box_corners_bev(internal)[0].tolist()
        for p in official:
            assert min(math.dist(p, q) for q in ours) < 1e-9

    def test_random_pairs_vs_dense_sampling(self):
        """Exact polygon overlap vs counting points of a fine grid inside both boxes."""
        rng = np.random.default_rng(0)
        n = 12
        a = np.column_stack([rng.uniform(-1, 1, (n, 2)), np.zeros(n), rng.uniform(0.5, 3, (n, 2)), np.ones(n),
                             rng.uniform(-np.pi, np.pi, n)])
        b = np.column_stack([a[:, :2] + rng.uniform(-1.5, 1.5, (n, 2)), np.zeros(n), rng.uniform(0.5, 3, (n, 2)),
                             np.ones(n), rng.uniform(-np.pi, np.pi, n)])
        exact = rotated_intersection_bev(torch.tensor(a), torch.tensor(b)).numpy()
        step = 0.01
        g = np.arange(-5, 5, step) + step / 2
        xx, yy = np.meshgrid(g, g, indexing="ij")
        pts = np.column_stack([xx.ravel(), yy.ravel(), np.zeros(xx.size)])
        in_a = points_in_boxes_np(pts, a)
        in_b = points_in_boxes_np(pts, b)
        for i in range(n):
            for j in range(n):
                sampled = np.count_nonzero(in_a[:, i] & in_b[:, j]) * step * step
                assert exact[i, j] == pytest.approx(sampled, abs=0.03), (i, j)

    def test_empty(self):
        assert rotated_intersection_bev(torch.zeros(0, 7), torch.zeros(3, 7)).shape == (0, 3)

    @pytest.mark.parametrize("impl", ["reference", "triton"])
    def test_box_op_impls_agree(self, impl):
        """The 3D IoU's BEV area goes through bevfusion.ops.boxes: every impl gives the same IoU (float64)."""
        rng = np.random.default_rng(1)
        n = 10
        a = np.column_stack([rng.uniform(-2, 2, (n, 3)), rng.uniform(0.5, 3, (n, 3)), rng.uniform(-np.pi, np.pi, n)])
        b = a + np.column_stack([rng.uniform(-1, 1, (n, 3)), rng.uniform(-0.3, 0.3, (n, 3)), rng.uniform(-1, 1, n)])
        a, b = torch.tensor(a), torch.tensor(b)
        expected = box_iou_3d_official(a, b, impl="cpu")
        assert (expected > 0).float().mean() > 0.3
        torch.testing.assert_close(box_iou_3d_official(a, b, impl=impl), expected, rtol=0, atol=1e-9)


class TestHungarianAssigner:
    def test_optimal_not_greedy(self):
        """Distances only (far-apart unit boxes, equal logits): L1 to A = (4, 5, 20), to B = (6, 15, 30).

        Greedy takes p0→A (4) first and then p1→B (15): 19. The optimum is p0→B + p1→A = 6 + 5 = 11.
        """
        preds = torch.tensor([_box(4, 0), _box(-5, 0), _box(0, 20)], dtype=torch.float64)
        gts = torch.tensor([_box(0, 0, w=0.5, l=0.5), _box(10, 0, w=0.5, l=0.5)], dtype=torch.float64)
        labels = torch.tensor([1, 1])
        logits = torch.zeros(3, 3, dtype=torch.float64)
        assigner = HungarianAssigner3D(**OFFICIAL_COSTS)
        cost, iou = assigner.cost_matrix(preds, gts, labels, logits, PC_RANGE)
        const = 0.15 * _focal_cost(0.0)
        l1 = np.array([[4, 6], [5, 15], [20, 30]], dtype=np.float64)
        np.testing.assert_allclose(cost.numpy(), const + 0.25 * l1 / 100, rtol=1e-12)
        assert float(iou.abs().max()) == 0.0
        res = assigner.assign(preds, gts, labels, logits, PC_RANGE)
        assert res.gt_inds.tolist() == [2, 1, 0]
        assert res.labels.tolist() == [1, 1, -1]
        assert res.pos_inds.tolist() == [0, 1] and res.neg_inds.tolist() == [2]

    def test_all_three_costs_by_hand(self):
        """Class and IoU terms change the answer: p0 sits exactly on A but is confident in B's class.

        The focal class term (about -0.43 for p0 → B) outweighs p0's 20 m BEV cost to B (0.05) and the
        IoU bonus it would get on A (-0.25), so the optimum is p1 → A, p0 → B and p2 stays background.
        """
        gts = torch.tensor([_box(0, 0, 0, w=2, l=4, h=2), _box(20, 0, 0, w=2, l=2, h=2)], dtype=torch.float64)
        labels = torch.tensor([0, 1])
        preds = torch.tensor([_box(0, 0, 0, w=2, l=4, h=2), _box(1, 0, 0, w=2, l=4, h=2),
                              _box(20, 1, 0, w=2, l=2, h=2)], dtype=torch.float64)
        logits = torch.tensor([[-4.0, 4.0], [4.0, -4.0], [-4.0, -4.0]], dtype=torch.float64)
        assigner = HungarianAssigner3D(**OFFICIAL_COSTS)
        cost, iou = assigner.cost_matrix(preds, gts, labels, logits, PC_RANGE)
        iou_hand = np.array([[1.0, 0.0], [1 / 3, 0.0], [0.0, 4 / 12]])  # last: y overlap 1 × x 2 × z 2 = 4
        np.testing.assert_allclose(iou.numpy(), iou_hand, rtol=1e-9, atol=1e-12)
        l1 = np.array([[0, 20], [1, 19], [21, 1]], dtype=np.float64)
        cls = np.array([[_focal_cost(float(logits[i, c])) for c in labels] for i in range(3)])
        hand = 0.15 * cls + 0.25 * l1 / 100 - 0.25 * iou_hand
        np.testing.assert_allclose(cost.numpy(), hand, rtol=1e-9)
        # brute force over all injective maps GT → prediction
        pairs = [(i, j) for i in range(3) for j in range(3) if i != j]
        best = min(pairs, key=lambda ij: hand[ij[0], 0] + hand[ij[1], 1])
        res = assigner.assign(preds, gts, labels, logits, PC_RANGE)
        assert res.gt_inds[best[0]].item() == 1 and res.gt_inds[best[1]].item() == 2
        assert best == (1, 0)  # worked out in the docstring
        assert res.gt_inds.tolist() == [2, 1, 0]
        assert res.max_overlaps.tolist() == pytest.approx([0.0, 1 / 3, 0.0])

    def test_no_gt(self):
        res = HungarianAssigner3D(**OFFICIAL_COSTS).assign(torch.zeros(4, 9), torch.zeros(0, 9),
                                                            torch.zeros(0, dtype=torch.long), torch.zeros(4, 10),
                                                            PC_RANGE)
        assert res.gt_inds.tolist() == [0, 0, 0, 0] and res.labels.tolist() == [-1] * 4
