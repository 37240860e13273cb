"""CenterHead (camera-only det): official key table, targets at [x, y], decoding by hand, NMS vs brute force,
training and eval output."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from bevfusion.config import load_config
from bevfusion.models.heads.centerpoint import CenterHead
from bevfusion.models.heads.coders import CenterPointBBoxCoder
from bevfusion.models.heads.targets import gaussian_radius
from bevfusion.ops.boxes import nms_bev
from bevfusion.structures.boxes import internal_to_official
from bevfusion.registry import check_kwargs

CAMERA_CFG = "configs/nuscenes/det/centerhead/lssfpn/camera/256x704/swint/default.yaml"


def _bn(prefix, c):
    return {f"{prefix}.{k}": (c,) for k in ("weight", "bias", "running_mean", "running_var")} | \
        {f"{prefix}.num_batches_tracked": ()}


def _expected_keys():
    """Facts §2.4 "heads.object (CenterHead)" written out."""
    e = {"shared_conv.conv.weight": (64, 256, 3, 3), **_bn("shared_conv.bn", 64)}
    for t, n in enumerate((1, 2, 2, 1, 2, 2)):
        for head, k in (("reg", 2), ("height", 1), ("dim", 3), ("rot", 2), ("vel", 2), ("heatmap", n)):
            p = f"task_heads.{t}.{head}"
            e.update({f"{p}.0.conv.weight": (64, 64, 3, 3), **_bn(f"{p}.0.bn", 64), f"{p}.1.weight": (k, 64, 3, 3),
                      f"{p}.1.bias": (k,)})
    return e


@pytest.fixture(scope="module")
def camera_head_cfg():
    cfg = load_config(CAMERA_CFG)
    kwargs = {k: v for k, v in dict(cfg.model.heads.object).items() if k != "type"}
    check_kwargs(CenterHead, kwargs, "model.heads.object")
    return kwargs


def test_keys_shapes_and_forward(camera_head_cfg):
    torch.manual_seed(0)
    head = CenterHead(**camera_head_cfg)
    assert {k: tuple(v.shape) for k, v in head.state_dict().items()} == _expected_keys()
    assert sum(p.numel() for p in head.parameters()) == 1_519_686
    head.eval()
    with torch.no_grad():
        preds = head(torch.randn(1, 256, 128, 128))
    assert len(preds) == 6
    for t, n in enumerate((1, 2, 2, 1, 2, 2)):
        assert {k: tuple(v.shape) for k, v in preds[t].items()} == {
            "reg": (1, 2, 128, 128), "height": (1, 1, 128, 128), "dim": (1, 3, 128, 128), "rot": (1, 2, 128, 128),
            "vel": (1, 2, 128, 128), "heatmap": (1, n, 128, 128)}
        out = head.get_bboxes(preds)
    boxes, scores, labels = out[0]
    assert boxes.shape[1] == 9 and len(scores) == len(labels) == len(boxes)
    assert labels.dtype == torch.long and (labels >= 0).all() and (labels < 10).all()


def test_targets_at_x_y(camera_head_cfg):
    head = CenterHead(**camera_head_cfg)
    # internal box: car at (10.3, -20.5), dx 4.5 (length), dy 1.9; a cone in the last task
    gt = torch.tensor([[10.3, -20.5, -1.0, 4.5, 1.9, 1.6, 0.0, 1.0, 2.0],
                       [-3.0, 7.0, -0.5, 0.4, 0.4, 1.0, 0.0, 0.0, 0.0]])
    heatmaps, annos, inds, masks = head.get_targets_single(internal_to_official(gt), torch.tensor([0, 9]))
    cell = 0.8
    fx, fy = (10.3 + 51.2) / cell, (-20.5 + 51.2) / cell  # 76.875, 38.375
    cx, cy = int(fx), int(fy)
    assert heatmaps[0].shape == (1, 128, 128) and heatmaps[0][0, cx, cy] == 1.0
    assert inds[0][0].item() == cx * 128 + cy and masks[0][0].item() == 1 and masks[0][1:].sum() == 0
    r = max(2, int(gaussian_radius((4.5 / cell, 1.9 / cell), 0.1)))
    assert (heatmaps[0][0] > 0).sum().item() == (2 * r + 1) ** 2
    a = annos[0][0].tolist()
    yaw_mm = -0.0 - math.pi / 2
    assert a == pytest.approx([fx - cx, fy - cy, -1.0 + 0.8, math.log(1.9), math.log(4.5), math.log(1.6),
                               math.sin(yaw_mm), math.cos(yaw_mm), 1.0, 2.0], abs=1e-5)
    # traffic_cone is class 1 of the last task [pedestrian, traffic_cone]
    assert heatmaps[5][1].max() == 1.0 and heatmaps[5][0].max() == 0.0
    assert all(h.max() == 0 for h in heatmaps[1:5])


def test_coder_decode_by_hand():
    coder = CenterPointBBoxCoder(pc_range=[-51.2, -51.2, -5, 51.2, 51.2, 3], out_size_factor=8, voxel_size=[0.1, 0.1],
                                 post_center_range=[-61.2, -61.2, -10, 61.2, 61.2, 10], max_num=3, score_threshold=0.1)
    X, Y = 6, 5
    heat = torch.zeros(1, 2, X, Y)
    heat[0, 1, 4, 2] = 0.9  # class 1 at x index 4, y index 2
    heat[0, 0, 1, 3] = 0.5
    heat[0, 0, 0, 0] = 0.05  # under the score threshold
    reg = torch.zeros(1, 2, X, Y)
    reg[0, :, 4, 2] = torch.tensor([0.25, 0.75])
    hei = torch.full((1, 1, X, Y), 0.3)
    dim = torch.ones(1, 3, X, Y) * torch.tensor([2.0, 4.0, 1.5])[None, :, None, None]
    rs, rc = torch.full((1, 1, X, Y), 1.0), torch.full((1, 1, X, Y), 0.0)
    vel = torch.zeros(1, 2, X, Y)
    out = coder.decode(heat, rs, rc, hei, dim, vel, reg=reg)[0]
    assert out["labels"].tolist() == [1, 0] and out["scores"].tolist() == pytest.approx([0.9, 0.5])
    assert out["bboxes"][0].tolist() == pytest.approx([(4.25) * 0.8 - 51.2, (2.75) * 0.8 - 51.2, 0.3, 2.0, 4.0, 1.5,
                                                       math.pi / 2, 0.0, 0.0], abs=1e-5)
    assert out["bboxes"][1, :2].tolist() == pytest.approx([1 * 0.8 - 51.2, 3 * 0.8 - 51.2], abs=1e-5)


def test_rotated_nms_vs_brute_force():
    rng = np.random.default_rng(0)
    n = 40
    boxes = torch.tensor(np.column_stack([rng.uniform(-4, 4, (n, 2)), np.zeros(n), rng.uniform(0.5, 3, (n, 2)),
                                          np.ones(n), rng.uniform(-np.pi, np.pi, n)]))
    scores = torch.tensor(rng.uniform(size=n))
    keep = nms_bev(boxes, scores, 0.2, pre_max=30, post_max=10).tolist()
    # brute force with a polygon-free IoU: dense sampling of each pair
    from bevfusion.structures.boxes import points_in_boxes_np
    step = 0.02
    g = np.arange(-7, 7, step) + step / 2
    xx, yy = np.meshgrid(g, g, indexing="ij")
    inside = points_in_boxes_np(np.column_stack([xx.ravel(), yy.ravel(), np.zeros(xx.size)]), boxes.numpy())
    order = np.argsort(-scores.numpy(), kind="stable")[:30]
    kept = []
    for i in order:
        ok = True
        for j in kept:
            inter = np.count_nonzero(inside[:, i] & inside[:, j])
            union = np.count_nonzero(inside[:, i] | inside[:, j])
            if inter / union > 0.2:
                ok = False
                break
        if ok:
            kept.append(int(i))
    assert keep == kept[:10]


def test_training_reduces_loss_and_eval(camera_head_cfg):
    torch.manual_seed(0)
    cfg = dict(camera_head_cfg)
    cfg["in_channels"] = 8
    cfg["share_conv_channel"] = 16
    cfg["separate_head"] = dict(cfg["separate_head"], head_conv=16)
    cfg["train_cfg"] = dict(cfg["train_cfg"], grid_size=[256, 256, 1])  # 32 × 32 cells of 3.2 m
    cfg["test_cfg"] = dict(cfg["test_cfg"], voxel_size=[0.4, 0.4])
    cfg["train_cfg"]["voxel_size"] = [0.4, 0.4, 8.0]
    cfg["bbox_coder"] = dict(cfg["bbox_coder"], voxel_size=[0.4, 0.4], max_num=50)
    head = CenterHead(**cfg)
    boxes = torch.tensor([[10.0, -20.0, -1.0, 4.5, 1.9, 1.6, 0.4, 2.0, 0.0],
                          [-15.0, 8.0, -0.8, 0.7, 0.7, 1.8, 0.0, 0.0, 0.5]])
    labels = torch.tensor([0, 8])
    feat = 0.1 * torch.randn(1, 8, 32, 32, generator=torch.Generator().manual_seed(0))
    for k, b in enumerate(boxes):
        feat[0, k, int((b[0] + 51.2) / 3.2), int((b[1] + 51.2) / 3.2)] += 3.0
    opt = torch.optim.Adam(head.parameters(), lr=3e-3)
    totals = []
    for _ in range(30):
        losses = head.loss([boxes], [labels], head(feat))
        assert set(losses) == {f"{kind}/task{t}" for kind in ("heatmap", "bbox") for t in range(6)}
        total = sum(losses.values())
        opt.zero_grad()
        total.backward()
        opt.step()
        totals.append(total.item())
    assert all(math.isfinite(t) for t in totals)
    assert np.mean(totals[-5:]) < 0.5 * np.mean(totals[:5]), totals
    # 30 steps leave BN running stats far from the batch stats: recalibrate on the one training sample
    for m in head.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None  # cumulative average: one pass gives the batch statistics
    with torch.no_grad():
        head(feat)
    head.eval()
    with torch.no_grad():
        (pred, scores, pred_labels), = head.get_bboxes(head(feat))
    assert pred.shape[1] == 9 and pred_labels.dtype == torch.long
    for b, c in zip(boxes, labels):
        mine = pred_labels == c
        assert mine.any()
        assert torch.dist(pred[mine][scores[mine].argmax()][:2], b[:2]).item() < 3.2
