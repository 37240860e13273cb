"""BEVSegmentationHead and BEVGridTransform (facts §5.2): keys, official shapes, grid_sample vs a
bilinear interpolation written out by hand, focal / BCE losses vs float64 formulas."""
from __future__ import annotations

import math

import pytest
import torch

from bevfusion.models.heads.segm import BEVGridTransform, BEVSegmentationHead, sigmoid_focal_loss


MAP_CLASSES = ["drivable_area", "ped_crossing", "walkway", "stop_line", "carpark_area", "divider"]
GRID = {"input_scope": [[-51.2, 51.2, 0.8], [-51.2, 51.2, 0.8]], "output_scope": [[-50, 50, 0.5], [-50, 50, 0.5]]}


def bn(prefix, c):
    return {f"{prefix}.weight": (c,), f"{prefix}.bias": (c,), f"{prefix}.running_mean": (c,),
            f"{prefix}.running_var": (c,), f"{prefix}.num_batches_tracked": ()}


@pytest.mark.parametrize("c,count", [(512, 4_723_718), (256, 1_182_214)])
def test_keys_shapes_count(c, count):
    head = BEVSegmentationHead(in_channels=c, grid_transform=GRID, classes=MAP_CLASSES, loss="focal")
    exp = {"classifier.0.weight": (c, c, 3, 3), **bn("classifier.1", c), "classifier.3.weight": (c, c, 3, 3),
           **bn("classifier.4", c), "classifier.6.weight": (6, c, 1, 1), "classifier.6.bias": (6,)}
    assert {k: tuple(v.shape) for k, v in head.state_dict().items()} == exp
    assert sum(p.numel() for p in head.parameters()) == count == 2 * 9 * c * c + 4 * c + 6 * c + 6
    assert not list(head.transform.parameters()) and not list(head.transform.buffers())


@torch.no_grad()
def test_official_resolution_eval_probabilities():
    """Camera-seg head (C 256) on the official [1, 256, 128, 128] map → [1, 6, 200, 200] probabilities.
    (The fusion head, C 512, has the same code path at 4× the cost; its keys are checked above.)"""
    head = BEVSegmentationHead(in_channels=256, grid_transform=GRID, classes=MAP_CLASSES).eval()
    y = head([torch.randn(1, 256, 128, 128)])
    assert tuple(y.shape) == (1, 6, 200, 200)
    assert float(y.min()) >= 0 and float(y.max()) <= 1


def _bilinear_by_hand(img, row, col):
    """Bilinear sample of img (H, W) at continuous pixel coordinates (centres at integers), zeros outside."""
    H, W = img.shape
    r0, c0 = math.floor(row), math.floor(col)
    total = 0.0
    for r, wr in ((r0, 1 - (row - r0)), (r0 + 1, row - r0)):
        for c, wc in ((c0, 1 - (col - c0)), (c0 + 1, col - c0)):
            if 0 <= r < H and 0 <= c < W:
                total += wr * wc * float(img[r, c])
    return total


def test_grid_transform_vs_bilinear_by_hand():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 128, 128, dtype=torch.float64)
    y = BEVGridTransform(**GRID)(x)
    assert tuple(y.shape) == (2, 3, 200, 200)
    for i, j in [(0, 0), (0, 199), (199, 0), (199, 199), (17, 123), (100, 100), (57, 3)]:
        px, py = -49.75 + 0.5 * i, -49.75 + 0.5 * j  # cell centres of the output grid (metres)
        row, col = (px + 51.2) / 0.8 - 0.5, (py + 51.2) / 0.8 - 0.5  # x → rows, y → columns
        for b in range(2):
            for c in range(3):
                # the grid itself is fp32 (as upstream): ~1e-5 px of coordinate error
                assert float(y[b, c, i, j]) == pytest.approx(_bilinear_by_hand(x[b, c], row, col), abs=2e-4)


def test_grid_transform_axes_and_zero_padding():
    """A map that grows along x (rows) stays a function of the output row only; outside is zero."""
    rows = torch.arange(128, dtype=torch.float64).view(1, 1, 128, 1).expand(1, 1, 128, 128)
    y = BEVGridTransform(**GRID)(rows)
    expect = (torch.arange(200, dtype=torch.float64) * 0.5 - 49.75 + 51.2) / 0.8 - 0.5
    torch.testing.assert_close(y[0, 0, :, 77], expect, atol=1e-4, rtol=0)
    torch.testing.assert_close(y[0, 0], y[0, 0, :, :1].expand(200, 200))
    wide = BEVGridTransform(input_scope=[[-10, 10, 1], [-10, 10, 1]], output_scope=[[-20, 20, 1], [-20, 20, 1]])
    out = wide(torch.ones(1, 1, 20, 20, dtype=torch.float64))
    assert float(out[0, 0, 0, 0]) == 0 and float(out[0, 0, 20, 20]) == 1


def test_focal_loss_vs_float64_formula():
    torch.manual_seed(1)
    logits = torch.randn(2, 50, 60) * 3
    target = (torch.rand(2, 50, 60) > 0.7).long()
    x, t = logits.double(), target.double()
    p = 1 / (1 + torch.exp(-x))
    ce = -(t * torch.log(p) + (1 - t) * torch.log(1 - p))
    p_t = p * t + (1 - p) * (1 - t)
    ref = (ce * (1 - p_t) ** 2).mean()
    got = sigmoid_focal_loss(logits, target)
    assert got.dtype == torch.float32
    assert float(got) == pytest.approx(float(ref), rel=1e-5)
    alpha_ref = ((0.25 * t + 0.75 * (1 - t)) * ce * (1 - p_t) ** 2).mean()
    assert float(sigmoid_focal_loss(logits, target, alpha=0.25)) == pytest.approx(float(alpha_ref), rel=1e-5)


@pytest.mark.parametrize("loss", ["focal", "xent"])
def test_training_losses_per_class(loss):
    torch.manual_seed(2)
    head = BEVSegmentationHead(in_channels=8, grid_transform=GRID, classes=MAP_CLASSES, loss=loss).train()
    x = torch.randn(2, 8, 128, 128)
    target = (torch.rand(2, 6, 200, 200) > 0.5).long()
    losses = head(x, target)
    assert list(losses) == [f"{c}/{loss}" for c in MAP_CLASSES]
    # recompute the logits in eval-free form: same BN batch statistics as the call above
    logits = head.classifier(head.transform(x)).double()
    for k, name in enumerate(MAP_CLASSES):
        t = target[:, k].double()
        p = torch.sigmoid(logits[:, k])
        ce = -(t * torch.log(p) + (1 - t) * torch.log(1 - p))
        ref = (ce * (1 - (p * t + (1 - p) * (1 - t))) ** 2).mean() if loss == "focal" else ce.mean()
        assert float(losses[name + "/" + loss].detach()) == pytest.approx(float(ref.detach()), rel=1e-4)
    sum(losses.values()).backward()
    assert head.classifier[0].weight.grad is not None
