"""TransFusionHead: official key table and shapes, query selection, box coder, Gaussian targets, training
and eval decoding."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from bevfusion.config import load_config
from bevfusion.models.heads.transfusion import TransFusionHead, local_max_suppression, select_queries
from bevfusion.models.heads.coders import TransFusionBBoxCoder
from bevfusion.models.heads.targets import draw_heatmap_gaussian, gaussian_2d, gaussian_radius
from bevfusion.ops.boxes import circle_nms
from bevfusion.structures.boxes import internal_to_official, official_to_internal
from bevfusion.registry import check_kwargs

FUSION_CFG = "configs/nuscenes/det/transfusion/secfpn/camera+lidar/swint_v0p075/convfuser.yaml"


def _bn(prefix: str, c: int) -> dict[str, tuple[int, ...]]:
    return {f"{prefix}.weight": (c,), f"{prefix}.bias": (c,), f"{prefix}.running_mean": (c,),
            f"{prefix}.running_var": (c,), f"{prefix}.num_batches_tracked": ()}


def _expected_keys() -> dict[str, tuple[int, ...]]:
    """The facts sheet §2.4 "heads.object (TransFusionHead)" table, written out."""
    e = {"shared_conv.weight": (128, 512, 3, 3), "shared_conv.bias": (128,),
         "heatmap_head.0.conv.weight": (128, 128, 3, 3), **_bn("heatmap_head.0.bn", 128),
         "heatmap_head.1.weight": (10, 128, 3, 3), "heatmap_head.1.bias": (10,),
         "class_encoding.weight": (128, 10, 1), "class_encoding.bias": (128,)}
    for attn in ("self_attn", "multihead_attn"):
        e[f"decoder.0.{attn}.in_proj_weight"] = (384, 128)
        e[f"decoder.0.{attn}.in_proj_bias"] = (384,)
        e[f"decoder.0.{attn}.out_proj.weight"] = (128, 128)
        e[f"decoder.0.{attn}.out_proj.bias"] = (128,)
    e.update({"decoder.0.linear1.weight": (256, 128), "decoder.0.linear1.bias": (256,),
              "decoder.0.linear2.weight": (128, 256), "decoder.0.linear2.bias": (128,)})
    for i in (1, 2, 3):
        e[f"decoder.0.norm{i}.weight"] = (128,)
        e[f"decoder.0.norm{i}.bias"] = (128,)
    for pe in ("self_posembed", "cross_posembed"):
        p = f"decoder.0.{pe}.position_embedding_head"
        e.update({f"{p}.0.weight": (128, 2, 1), f"{p}.0.bias": (128,), **_bn(f"{p}.1", 128),
                  f"{p}.3.weight": (128, 128, 1), f"{p}.3.bias": (128,)})
    for head, k in (("center", 2), ("height", 1), ("dim", 3), ("rot", 2), ("vel", 2), ("heatmap", 10)):
        p = f"prediction_heads.0.{head}"
        e.update({f"{p}.0.conv.weight": (64, 128, 1), **_bn(f"{p}.0.bn", 64), f"{p}.1.weight": (k, 64, 1),
                  f"{p}.1.bias": (k,)})
    return e


@pytest.fixture(scope="module")
def fusion_head_cfg():
    cfg = load_config(FUSION_CFG)
    kwargs = {k: v for k, v in dict(cfg.model.heads.object).items() if k != "type"}
    check_kwargs(TransFusionHead, kwargs, "model.heads.object")  # the YAML goes straight in
    return kwargs


class TestOfficialLayout:
    def test_keys_shapes_and_forward_at_official_resolution(self, fusion_head_cfg):
        torch.manual_seed(0)
        head = TransFusionHead(**fusion_head_cfg)
        got = {k: tuple(v.shape) for k, v in head.state_dict().items()}
        assert got == _expected_keys()
        assert sum(p.numel() for p in head.parameters()) == 1_034_910
        assert all(m.momentum == 0.1 for m in head.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm))
        head.eval()
        with torch.no_grad():
            preds = head(torch.randn(1, 512, 180, 180))
        shapes = {k: tuple(v.shape) for k, v in preds.items()}
        assert shapes == {"center": (1, 2, 200), "height": (1, 1, 200), "dim": (1, 3, 200), "rot": (1, 2, 200),
                          "vel": (1, 2, 200), "heatmap": (1, 10, 200), "query_heatmap_score": (1, 10, 200),
                          "dense_heatmap": (1, 10, 180, 180), "query_labels": (1, 200)}
        # each query's centre starts at its own cell centre: the offset is a prediction on top of it
        out = head.get_bboxes(preds)
        boxes, scores, labels = out[0]
        assert boxes.shape[1] == 9 and scores.shape == labels.shape == boxes.shape[:1] and len(boxes) <= 200
        assert labels.dtype == torch.long

    def test_bev_pos_is_x_major(self):
        pos = TransFusionHead.create_2D_grid(3, 5)
        assert pos.shape == (1, 15, 2)
        assert pos[0, 7].tolist() == [1.5, 2.5]  # index = x·Y + y = 1·5 + 2
        assert pos[0, 14].tolist() == [2.5, 4.5]

    def test_state_dict_round_trip(self, fusion_head_cfg):
        a, b = TransFusionHead(**fusion_head_cfg), TransFusionHead(**fusion_head_cfg)
        b.load_state_dict(a.state_dict(), strict=True)
        for (k, v), w in zip(a.state_dict().items(), b.state_dict().values()):
            assert torch.equal(v, w), k


class TestQuerySelection:
    @staticmethod
    def _naive(heat: np.ndarray, num: int, skip=(8, 9)):
        B, C, X, Y = heat.shape
        out = []
        for b in range(B):
            cand = []
            for c in range(C):
                for x in range(X):
                    for y in range(Y):
                        v = heat[b, c, x, y]
                        if c not in skip:
                            if x == 0 or y == 0 or x == X - 1 or y == Y - 1:
                                continue  # zero border of the official local max
                            if v != heat[b, c, x - 1:x + 2, y - 1:y + 2].max():
                                continue
                        cand.append((v, c, x * Y + y))
            cand.sort(key=lambda t: -t[0])
            out.append(cand[:num])
        return out

    def test_vs_naive_loop(self):
        rng = np.random.default_rng(0)
        heat = rng.uniform(size=(2, 10, 9, 11)).astype(np.float32)
        sup = local_max_suppression(torch.from_numpy(heat), 3, (8, 9))
        labels, cells = select_queries(sup.reshape(2, 10, -1), 40)
        for b, expected in enumerate(self._naive(heat, 40)):
            assert labels[b].tolist() == [c for _, c, _ in expected]
            assert cells[b].tolist() == [i for _, _, i in expected]

    def test_border_and_skip_classes(self):
        heat = torch.zeros(1, 10, 5, 5)
        heat[0, 0, 0, 2] = 0.9  # border peak: suppressed for ordinary classes
        heat[0, 8, 0, 2] = 0.8  # pedestrian: never suppressed
        heat[0, 8, 0, 3] = 0.7  # ... not even next to a higher value
        heat[0, 1, 2, 2], heat[0, 1, 2, 3] = 0.6, 0.5  # plateau-free neighbours: only the max survives
        sup = local_max_suppression(heat, 3, (8, 9))
        assert sup[0, 0, 0, 2] == 0 and sup[0, 8, 0, 2] == 0.8 and sup[0, 8, 0, 3] == 0.7
        assert sup[0, 1, 2, 2] == 0.6 and sup[0, 1, 2, 3] == 0


class TestBoxCoder:
    coder = TransFusionBBoxCoder(pc_range=[-54.0, -54.0], out_size_factor=8, voxel_size=[0.075, 0.075],
                                 post_center_range=[-61.2, -61.2, -10.0, 61.2, 61.2, 10.0], score_threshold=0.0,
                                 code_size=10)

    def test_encode_by_hand(self):
        box = torch.tensor([[6.0, -12.0, -1.0, 2.0, 4.0, 1.5, 0.3, 1.0, -2.0]], dtype=torch.float64)
        t = self.coder.encode(box)[0].tolist()
        cell = 8 * 0.075
        expected = [60 / cell, 42 / cell, -1.0 + 0.75, math.log(2), math.log(4), math.log(1.5), math.sin(0.3),
                    math.cos(0.3), 1.0, -2.0]
        assert t == pytest.approx(expected, rel=1e-12)

    def test_decode_by_hand_and_filter(self):
        center = torch.tensor([[[100.0, 250.0], [90.0, 0.0]]])  # (1, 2, 2): second box x = 96 m: filtered
        height = torch.tensor([[[0.5, 0.0]]])
        dim = torch.log(torch.tensor([[[2.0, 1.0], [4.0, 1.0], [1.0, 1.0]]]))
        rot = torch.tensor([[[1.0, 0.0], [1.0, 1.0]]])  # atan2(1, 1) = pi/4
        vel = torch.tensor([[[0.5, 0.0], [-0.5, 0.0]]])
        heat = torch.tensor([[[0.1, 0.9], [0.7, 0.2], [0.3, 0.1]]])
        out = self.coder.decode(heat, rot, dim, center, height, vel, filter=False)[0]
        assert out["bboxes"][0].tolist() == pytest.approx([6.0, 0.0, 0.0, 2.0, 4.0, 1.0, math.pi / 4, 0.5, -0.5],
                                                          abs=1e-5)
        assert out["labels"].tolist() == [1, 0] and out["scores"].tolist() == pytest.approx([0.7, 0.9])
        kept = self.coder.decode(heat, rot, dim, center, height, vel, filter=True)[0]
        assert len(kept["bboxes"]) == 1 and kept["labels"].tolist() == [1]

    def test_round_trip_and_z_convention(self):
        """internal → official → encode → decode → internal is the identity, z centre included, and the
        height target is z_centre + h/2, which is what official checkpoints regress (the z quirk)."""
        rng = np.random.default_rng(0)
        n = 20
        internal = torch.tensor(np.column_stack([
            rng.uniform(-50, 50, (n, 2)), rng.uniform(-3, 1, n), rng.uniform(0.3, 10, (n, 3)),
            rng.uniform(-np.pi, np.pi, n), rng.normal(size=(n, 2))]), dtype=torch.float64)
        official = internal_to_official(internal)
        t = self.coder.encode(official)
        assert torch.allclose(t[:, 2], internal[:, 2] + internal[:, 5] / 2)
        assert torch.allclose(t[:, 3:5].exp(), internal[:, [4, 3]])  # official (w, l) = internal (dy, dx)
        T = t.T[None]
        dec = self.coder.decode(torch.ones(1, 1, n, dtype=torch.float64), T[:, 6:8], T[:, 3:6], T[:, 0:2],
                                T[:, 2:3], T[:, 8:10])[0]["bboxes"]
        back = official_to_internal(dec)
        assert torch.allclose(back[:, :6], internal[:, :6], atol=1e-9)
        assert torch.allclose(back[:, 7:], internal[:, 7:], atol=1e-9)
        dyaw = (back[:, 6] - internal[:, 6] + math.pi) % (2 * math.pi) - math.pi
        assert dyaw.abs().max() < 1e-9


class TestGaussian:
    def test_radius_by_hand(self):
        # (h, w) = (3, 2), overlap 0.1: the three CenterPoint roots are 3.65798, 6.84391, 1.05242
        assert gaussian_radius((3, 2), 0.1) == pytest.approx((-1 + math.sqrt(9.64)) / 2, rel=1e-12)
        assert gaussian_radius((3, 2), 0.1) == pytest.approx(1.0524174, rel=1e-6)
        assert gaussian_radius((2, 3), 0.1) == gaussian_radius((3, 2), 0.1)

    def test_draw_vs_direct_formula(self):
        H, W = 12, 9
        heat = torch.zeros(H, W)
        draw_heatmap_gaussian(heat, (1, 10), 3)  # (col, row) near two borders
        draw_heatmap_gaussian(heat, (5, 6), 2)
        expected = np.zeros((H, W))
        for (col, row, r) in ((1, 10, 3), (5, 6, 2)):
            sigma = (2 * r + 1) / 6
            for i in range(H):
                for j in range(W):
                    if abs(i - row) <= r and abs(j - col) <= r:
                        v = math.exp(-((i - row) ** 2 + (j - col) ** 2) / (2 * sigma * sigma))
                        expected[i, j] = max(expected[i, j], v)
        np.testing.assert_allclose(heat.numpy(), expected, rtol=1e-6, atol=1e-7)
        assert heat[10, 1] == 1.0 and heat[6, 5] == 1.0

    def test_gaussian_2d_cutoff(self):
        g = gaussian_2d((7, 7), sigma=7 / 6)
        assert g[3, 3] == 1.0 and g.shape == (7, 7)

    def test_heatmap_target_cell_and_radius(self, fusion_head_cfg):
        head = TransFusionHead(**fusion_head_cfg)
        # internal box: centre (10, -20), length dx 4.5 along x, width dy 1.9
        gt = internal_to_official(torch.tensor([[10.0, -20.0, -1.0, 4.5, 1.9, 1.6, 0.0, 0.0, 0.0]]))
        heat = head.heatmap_target(gt, torch.tensor([3]), torch.device("cpu"))
        assert heat.shape == (10, 180, 180)
        cx, cy = int((10 + 54) / 0.6), int((-20 + 54) / 0.6)  # 106, 56: row = x, col = y
        assert heat[3].argmax().item() == cx * 180 + cy and heat[3, cx, cy] == 1.0
        # official w = 1.9 m (x-size at yaw_mm 0), l = 4.5 m, in cells; radius ≥ min_radius 2
        r = max(2, int(gaussian_radius((4.5 / 0.6, 1.9 / 0.6), 0.1)))
        assert (heat[3] > 0).sum().item() == (2 * r + 1) ** 2
        assert heat[[i for i in range(10) if i != 3]].abs().sum() == 0


def test_circle_nms():
    centres = np.array([[0.0, 0.0], [0.3, 0.0], [1.0, 0.0], [0.2, 0.2]])
    scores = np.array([0.5, 0.9, 0.4, 0.3])
    # squared distance threshold 0.175: 1 suppresses 0 (0.09) and 3 (0.05); 2 is 0.49 away
    assert circle_nms(torch.from_numpy(centres), torch.from_numpy(scores), 0.175).tolist() == [1, 2]


# ---------------------------------------------------------------------------------------------- small head
SMALL = dict(
    num_proposals=20, auxiliary=True, in_channels=16, hidden_channel=32, num_classes=10, num_decoder_layers=1,
    num_heads=4, nms_kernel_size=3, ffn_channel=64, dropout=0.0, bn_momentum=0.1, activation="relu",
    train_cfg=dict(dataset="nuScenes", point_cloud_range=[-51.2, -51.2, -5.0, 51.2, 51.2, 3.0],
                   grid_size=[256, 256, 1], voxel_size=[0.4, 0.4, 8.0], out_size_factor=8, gaussian_overlap=0.1,
                   min_radius=2, pos_weight=-1, code_weights=[1.0] * 8 + [0.2, 0.2],
                   assigner=dict(type="HungarianAssigner3D",
                                 iou_calculator=dict(type="BboxOverlaps3D", coordinate="lidar"),
                                 cls_cost=dict(type="FocalLossCost", gamma=2.0, alpha=0.25, weight=0.15),
                                 reg_cost=dict(type="BBoxBEVL1Cost", weight=0.25),
                                 iou_cost=dict(type="IoU3DCost", weight=0.25))),
    test_cfg=dict(dataset="nuScenes", grid_size=[256, 256, 1], out_size_factor=8, voxel_size=[0.4, 0.4],
                  pc_range=[-51.2, -51.2], nms_type=None),
    common_heads=dict(center=[2, 2], height=[1, 2], dim=[3, 2], rot=[2, 2], vel=[2, 2]),
    bbox_coder=dict(type="TransFusionBBoxCoder", pc_range=[-51.2, -51.2],
                    post_center_range=[-61.2, -61.2, -10.0, 61.2, 61.2, 10.0], score_threshold=0.0,
                    out_size_factor=8, voxel_size=[0.4, 0.4], code_size=10),
    loss_cls=dict(type="FocalLoss", use_sigmoid=True, gamma=2.0, alpha=0.25, reduction="mean", loss_weight=1.0),
    loss_heatmap=dict(type="GaussianFocalLoss", reduction="mean", loss_weight=1.0),
    loss_bbox=dict(type="L1Loss", reduction="mean", loss_weight=0.25),
)


def _scene():
    """Internal-convention GT boxes and a BEV feature (32 × 32 cells of 3.2 m) that marks them."""
    boxes = torch.tensor([[10.0, -20.0, -1.0, 4.5, 1.9, 1.6, 0.4, 2.0, 0.0],
                          [-15.0, 8.0, -0.8, 0.7, 0.7, 1.8, 0.0, 0.0, 0.5],
                          [30.0, 30.0, -0.5, 11.0, 2.9, 3.5, -1.2, 0.0, 0.0]])
    labels = torch.tensor([0, 8, 3])
    g = torch.Generator().manual_seed(0)
    feat = 0.1 * torch.randn(1, 16, 32, 32, generator=g)
    for k, (b, c) in enumerate(zip(boxes, labels)):
        x, y = int((b[0] + 51.2) / 3.2), int((b[1] + 51.2) / 3.2)
        feat[0, k, x, y] += 3.0
        feat[0, 4 + int(c) % 10, x, y] += 3.0
    return feat, boxes, labels


def test_training_reduces_loss_and_eval_decodes():
    torch.manual_seed(0)
    head = TransFusionHead(**SMALL)
    feat, boxes, labels = _scene()
    opt = torch.optim.Adam(head.parameters(), lr=3e-3)
    totals = []
    for _ in range(40):
        losses = head.loss([boxes], [labels], head(feat))
        assert set(losses) == {"loss_heatmap", "layer_-1_loss_cls", "layer_-1_loss_bbox", "matched_ious"}
        assert not losses["matched_ious"].requires_grad
        total = sum(v for k, v in losses.items() if "loss" in k)
        opt.zero_grad()
        total.backward()
        opt.step()
        totals.append(total.item())
    assert all(math.isfinite(t) for t in totals)
    assert np.mean(totals[-5:]) < 0.5 * np.mean(totals[:5]), totals
    assert losses["matched_ious"].item() > 0

    head.eval()
    with torch.no_grad():
        out = head.get_bboxes(head(feat))
    assert len(out) == 1
    pred_boxes, scores, pred_labels = out[0]
    assert pred_boxes.shape == (20, 9) and scores.shape == (20,) and pred_labels.shape == (20,)
    assert pred_labels.dtype == torch.long and (scores >= 0).all() and (scores <= 1).all()
    # the best-scoring box of each GT class sits on that GT (within a cell)
    for b, c in zip(boxes, labels):
        mine = pred_labels == c
        assert mine.any()
        best = pred_boxes[mine][scores[mine].argmax()]
        assert torch.dist(best[:2], b[:2]).item() < 3.2


@pytest.mark.parametrize("nms_type", ["circle", "rotate"])
def test_optional_class_nms(nms_type):
    """nms_type set: classes 0-7 untouched, pedestrians and cones de-duplicated separately (radius 0.175)."""
    head = TransFusionHead(**{**SMALL, "test_cfg": {**SMALL["test_cfg"], "nms_type": nms_type}})
    # official layout: two overlapping cars, two overlapping pedestrians, a cone on the same spot
    boxes = torch.tensor([[0.0, 0.0, 0.0, 1.9, 4.5, 1.6, 0.0], [0.1, 0.0, 0.0, 1.9, 4.5, 1.6, 0.0],
                          [5.0, 5.0, 0.0, 0.7, 0.7, 1.8, 0.0], [5.1, 5.0, 0.0, 0.7, 0.7, 1.8, 0.0],
                          [5.0, 5.0, 0.0, 0.4, 0.4, 1.0, 0.0]])
    scores = torch.tensor([0.9, 0.8, 0.5, 0.7, 0.3])
    labels = torch.tensor([0, 0, 8, 8, 9])
    assert head._class_nms(boxes, scores, labels, nms_type).tolist() == [0, 1, 3, 4]


def test_loss_with_empty_gt_and_batch_of_two():
    torch.manual_seed(0)
    head = TransFusionHead(**SMALL)
    feat, boxes, labels = _scene()
    feat2 = torch.cat([feat, feat.flip(-1)])
    preds = head(feat2)
    losses = head.loss([boxes, torch.zeros(0, 9)], [labels, torch.zeros(0, dtype=torch.long)], preds)
    total = sum(v for k, v in losses.items() if "loss" in k)
    total.backward()
    assert math.isfinite(total.item())
    head.eval()
    with torch.no_grad():
        out = head.get_bboxes(head(feat2))
    assert len(out) == 2 and all(o[0].shape[1] == 9 for o in out)


def test_decoder_layer_vs_manual_attention():
    """Packed (q, k, v) in_proj rows, positional embedding on the query, the key *and* the value, post-norm."""
    from bevfusion.models.heads.transfusion import PositionEmbeddingLearned, TransformerDecoderLayer

    torch.manual_seed(0)
    C, H, Pq, Pk = 16, 4, 5, 7
    layer = TransformerDecoderLayer(C, H, 32, 0.1, "relu", self_posembed=PositionEmbeddingLearned(2, C),
                                    cross_posembed=PositionEmbeddingLearned(2, C)).double().eval()
    for p in layer.parameters():  # non-trivial biases and norms
        torch.nn.init.normal_(p, std=0.3)
    query, key = torch.randn(2, C, Pq, dtype=torch.float64), torch.randn(2, C, Pk, dtype=torch.float64)
    qpos, kpos = torch.rand(2, Pq, 2, dtype=torch.float64) * 9, torch.rand(2, Pk, 2, dtype=torch.float64) * 9
    out = layer(query, key, qpos, kpos)

    def attn(mha, q, k, v):  # (B, P, C) each
        wq, wk, wv = mha.in_proj_weight.chunk(3)
        bq, bk, bv = mha.in_proj_bias.chunk(3)
        Q, K, V = q @ wq.T + bq, k @ wk.T + bk, v @ wv.T + bv
        d = C // H
        split = lambda t: t.reshape(t.shape[0], t.shape[1], H, d).transpose(1, 2)  # noqa: E731
        w = torch.softmax(split(Q) @ split(K).transpose(-1, -2) / math.sqrt(d), dim=-1)
        o = (w @ split(V)).transpose(1, 2).reshape(q.shape[0], q.shape[1], C)
        return o @ mha.out_proj.weight.T + mha.out_proj.bias

    qe = layer.self_posembed(qpos).transpose(1, 2)  # (B, Pq, C)
    ke = layer.cross_posembed(kpos).transpose(1, 2)
    x = query.transpose(1, 2)
    kv = key.transpose(1, 2) + ke
    x = layer.norm1(x + attn(layer.self_attn, x + qe, x + qe, x + qe))
    x = layer.norm2(x + attn(layer.multihead_attn, x + qe, kv, kv))
    x = layer.norm3(x + layer.linear2(torch.relu(layer.linear1(x))))
    torch.testing.assert_close(out, x.transpose(1, 2), rtol=1e-10, atol=1e-10)


def test_loss_values_by_hand():
    """Three queries, two GTs: q0 and q2 decode exactly onto the GTs and carry their class, q1 is far away.

    Expected: q0 → A, q2 → B; bbox loss 0; classification loss = focal over 3 × 10 logits with targets
    (A's class, background, B's class) / 2 positives; heatmap loss = Gaussian focal vs the drawn targets.
    """
    head = TransFusionHead(**{**SMALL, "num_proposals": 3})
    gt = torch.tensor([[10.0, -20.0, -1.0, 4.5, 1.9, 1.6, 0.4, 2.0, 0.0],
                       [-15.0, 8.0, -0.8, 0.7, 0.7, 1.8, 0.0, 0.0, 0.5]])
    labels = torch.tensor([0, 8])
    t = head.bbox_coder.encode(internal_to_official(gt.double())).float()  # (2, 10)
    far = t[0].clone()
    far[0:2] = torch.tensor([2.0, 2.0])  # about 45 m away from both
    codes = torch.stack([t[0], far, t[1]]).T[None]  # (1, 10, 3)
    logits = torch.full((1, 10, 3), -3.0)
    logits[0, 0, 0], logits[0, 8, 2], logits[0, 5, 1] = 2.0, 1.5, 0.5
    dense = torch.randn(1, 10, 32, 32, generator=torch.Generator().manual_seed(0))
    preds = {"center": codes[:, 0:2], "height": codes[:, 2:3], "dim": codes[:, 3:6], "rot": codes[:, 6:8],
             "vel": codes[:, 8:10], "heatmap": logits, "dense_heatmap": dense}
    losses = head.loss([gt], [labels], preds)
    assert losses["layer_-1_loss_bbox"].item() == pytest.approx(0.0, abs=1e-5)
    assert losses["matched_ious"].item() == pytest.approx(1.0, abs=1e-4)
    target = np.array([0, 10, 8])
    expected_cls = 0.0
    for q in range(3):
        for c in range(10):
            x, y = float(logits[0, c, q]), 1.0 if target[q] == c else 0.0
            p = 1 / (1 + math.exp(-x))
            bce = -(y * math.log(p) + (1 - y) * math.log(1 - p))
            expected_cls += bce * (0.25 if y else 0.75) * ((1 - p) if y else p) ** 2
    assert losses["layer_-1_loss_cls"].item() == pytest.approx(expected_cls / 2, rel=1e-5)
    heat_t = head.heatmap_target(internal_to_official(gt), labels, torch.device("cpu")).double()
    p = dense.double().sigmoid().clamp(1e-4, 1 - 1e-4)[0]
    pos = (heat_t == 1).double()
    hm = (-(p + 1e-12).log() * (1 - p) ** 2 * pos - (1 - p + 1e-12).log() * p ** 2 * (1 - heat_t) ** 4).sum()
    assert pos.sum().item() == 2
    assert losses["loss_heatmap"].item() == pytest.approx(hm.item() / 2, rel=1e-5)


def test_heatmap_init_bias_is_opt_in():
    """The official head keeps torch's init for its class logits; `heatmap_init_bias` (not official) sets the dense
    heatmap's and every decoder layer's class-logit bias, and the initial heatmap loss drops accordingly."""
    torch.manual_seed(0)
    official = TransFusionHead(**SMALL)
    assert official.heatmap_head[-1].bias.abs().max() < 1.0  # torch's uniform(-1/sqrt(fan_in), ...) init
    torch.manual_seed(0)
    biased = TransFusionHead(**{**SMALL, "heatmap_init_bias": -2.19})
    assert torch.all(biased.heatmap_head[-1].bias == torch.tensor(-2.19))
    for ffn in biased.prediction_heads:
        assert torch.all(ffn.heatmap[-1].bias == torch.tensor(-2.19))
    # every other parameter is the official init (same seed, same construction order)
    a, b = official.state_dict(), biased.state_dict()
    changed = [k for k in a if not torch.equal(a[k], b[k])]
    assert sorted(changed) == sorted(["heatmap_head.1.bias"] + [f"prediction_heads.{i}.heatmap.1.bias"
                                                                 for i in range(len(biased.prediction_heads))])
    # sigmoid(-2.19) ~ 0.1: the untrained dense heatmap is mostly background, as the targets are
    x = torch.randn(1, SMALL["in_channels"], 16, 16)
    assert torch.sigmoid(biased.heatmap_head(biased.shared_conv(x))).mean() < 0.2


def test_settings_errors_name_the_key():
    from bevfusion.registry import RegistryError, build

    bad = {**SMALL["train_cfg"], "min_radus": 2}
    with pytest.raises(RegistryError, match=r"^model.heads.object: train_cfg: unknown key min_radus \(did you mean "
                                            r"min_radius\?\)"):
        build({"type": "TransFusionHead", **{**SMALL, "train_cfg": bad}}, "model.heads.object")
    bad = {k: v for k, v in SMALL["train_cfg"].items() if k != "grid_size"}
    with pytest.raises(RegistryError, match=r"train_cfg: missing key grid_size"):
        build({"type": "TransFusionHead", **{**SMALL, "train_cfg": bad}}, "model.heads.object")
    bad = {**SMALL["train_cfg"], "min_radius": "two"}
    with pytest.raises(RegistryError, match=r"train_cfg.min_radius: expected an integer, got 'two'"):
        build({"type": "TransFusionHead", **{**SMALL, "train_cfg": bad}}, "model.heads.object")
