"""CenterPoint detection head (official `CenterHead` with `SeparateHead` branches; camera-only det, facts §1.6.3).

Per task group (e.g. [truck, construction_vehicle]) a `SeparateHead` predicts, at every BEV cell of the
(B, C, X, Y) feature: reg (2, sub-cell offset), height (1, gravity-centre z), dim (3, log sizes), rot (2,
sin/cos), vel (2) and a class heatmap (one channel per class of the task). Cells are indexed [x, y] as
everywhere in the model: the target index is x·Y + y, heatmaps are drawn at row x, column y, and the
decoder reads row → x.

Box conventions are the ones of `bevfusion.models.heads.transfusion`: `loss` takes and `get_bboxes`
returns internal boxes (x, y, z centre, dx, dy, dz, yaw, vx, vy); inside, the official layout (x, y, z,
w, l, h, yaw_mm, vx, vy) is used with z unchanged, so the height target is z_centre + h/2 as in the
official checkpoints (the "z quirk", facts §6.3) and decoding subtracts h/2 again.

As upstream, `SeparateHead.init_weights` (Kaiming, heatmap bias -2.19) exists but is not run by the
constructor: BEVFusion never calls it (facts §2.5), so the official models start from torch defaults.
Differences from upstream: NaN regression targets are zeroed as well as masked (upstream masks them but
the NaN still reaches the loss); the top-k size is clamped to the number of cells on tiny grids.
"""
from __future__ import annotations

import copy
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from bevfusion.models.heads.transfusion import ConvBNReLU
from bevfusion.models.heads.settings import CenterHeadTestSettings, CenterHeadTrainSettings, settings_from
from bevfusion.models.heads.coders import CenterPointBBoxCoder
from bevfusion.models.heads.targets import draw_heatmap_gaussian, gaussian_radius
from bevfusion.ops.boxes import circle_nms, nms_bev
from bevfusion.registry import Partial, built
from bevfusion.structures.boxes import internal_to_official, official_to_internal

__all__ = ["CenterHead", "SeparateHead", "CenterPointBBoxCoder"]


class SeparateHead(nn.Module):
    """One Sequential per output: (num_conv - 1) × [Conv2d k×k → BN → ReLU], then Conv2d k×k → channels (bias).

    Args:
        in_channels: input channels (the shared conv's 64).
        heads: {name: (channels, num_conv)} in module order.
        head_conv: hidden channels (64). final_kernel: k (3 in the official config).
        init_bias: heatmap bias used by `init_weights` (-2.19; never called by BEVFusion).
    """

    def __init__(self, in_channels: int, heads: Mapping[str, Sequence[int]], head_conv: int = 64,
                 final_kernel: int = 1, init_bias: float = -2.19, conv_cfg: Any = None, norm_cfg: Any = None,
                 bias: str = "auto", init_cfg: Any = None, num_cls: int | None = None):
        super().__init__()
        self.heads = {k: tuple(v) for k, v in heads.items()}
        self.init_bias = init_bias
        for name, (classes, num_conv) in self.heads.items():
            layers, c_in = [], in_channels
            for _ in range(num_conv - 1):
                layers.append(ConvBNReLU(c_in, head_conv, final_kernel))
                c_in = head_conv
            layers.append(nn.Conv2d(head_conv, classes, final_kernel, padding=final_kernel // 2, bias=True))
            self.add_module(name, nn.Sequential(*layers))

    def init_weights(self) -> None:
        """mmcv's Kaiming init of every Conv2d and the heatmap bias (not run by BEVFusion)."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, a=0, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        if "heatmap" in self.heads:
            self.heatmap[-1].bias.data.fill_(self.init_bias)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name)(x) for name in self.heads}


class CenterHead(nn.Module):
    """CenterPoint head with the official constructor keys (camera-only det config, facts §1.6.3).

    Args:
        in_channels: BEV feature channels (256).
        tasks: class-name groups, e.g. [[car], [truck, construction_vehicle], ...] (or official dicts with
            `class_names`); labels are indices into their concatenation.
        train_cfg: point_cloud_range, grid_size, voxel_size, out_size_factor, dense_reg, gaussian_overlap,
            max_objs, min_radius, code_weights.
        test_cfg: post_center_limit_range, score_threshold, nms_type (one or per task: circle | rotate),
            min_radius (per task, circle NMS squared-distance thresholds), nms_scale, nms_thr,
            pre_max_size, post_max_size.
        bbox_coder: {type: CenterPointBBoxCoder, ...}. common_heads: {name: (channels, num_conv)}.
        loss_cls, loss_bbox: {type: GaussianFocalLoss | L1Loss, ...}.
        separate_head: {type: SeparateHead, init_bias, final_kernel}. share_conv_channel: 64.
        norm_bbox: sizes regressed as logs.
        num_heatmap_convs: convs of each heatmap branch (2).
        conv_cfg, norm_cfg, bias, init_cfg: accepted so official configs load, and ignored (Conv2d + BN2d
            + ReLU modules as upstream builds them by default).
    """

    def __init__(self, in_channels: int | Sequence[int] = 128, tasks: Sequence[Any] | None = None,
                 train_cfg: Mapping[str, Any] | None = None, test_cfg: Mapping[str, Any] | None = None,
                 bbox_coder: Mapping[str, Any] | CenterPointBBoxCoder | None = None,
                 common_heads: Mapping[str, Sequence[int]] | None = None, loss_cls: Any = None, loss_bbox: Any = None,
                 separate_head: Mapping[str, Any] | None = None, share_conv_channel: int = 64,
                 num_heatmap_convs: int = 2, conv_cfg: Any = None, norm_cfg: Any = None, bias: str = "auto",
                 norm_bbox: bool = True, init_cfg: Any = None):
        super().__init__()
        if in_channels is None:
            raise ValueError("CenterHead: in_channels must be set (the decoder's output channels)")
        if isinstance(in_channels, (list, tuple)):
            in_channels = sum(in_channels)
        if not tasks:
            raise ValueError("CenterHead: tasks must list the class groups")
        self.class_names = [list(t["class_names"]) if isinstance(t, Mapping) else list(t) for t in tasks]
        self.num_classes = [len(t) for t in self.class_names]
        self.train_cfg = settings_from(CenterHeadTrainSettings, train_cfg, "train_cfg")
        self.test_cfg = settings_from(CenterHeadTestSettings, test_cfg, "test_cfg") or CenterHeadTestSettings()
        self.norm_bbox = norm_bbox
        self.loss_cls = built(loss_cls, "loss_cls", {"type": "GaussianFocalLoss", "reduction": "mean"})
        self.loss_bbox = built(loss_bbox, "loss_bbox", {"type": "L1Loss", "reduction": "none", "loss_weight": 0.25})
        if bbox_coder is None:
            raise ValueError("bbox_coder is required ({type: CenterPointBBoxCoder, pc_range, out_size_factor, "
                             "voxel_size, ...})")
        self.bbox_coder = built(bbox_coder, "bbox_coder", kind=CenterPointBBoxCoder)

        self.shared_conv = ConvBNReLU(in_channels, share_conv_channel, 3)
        sep = built(separate_head, "separate_head", {"type": "SeparateHead", "init_bias": -2.19, "final_kernel": 3},
                    kind=Partial)
        if sep.target is not SeparateHead:
            raise ValueError(f"separate_head: unsupported type {sep.target.__name__} (expected SeparateHead)")
        common_heads = dict(common_heads or {})
        self.task_heads = nn.ModuleList()
        for num_cls in self.num_classes:
            heads = copy.deepcopy(common_heads)
            heads["heatmap"] = (num_cls, num_heatmap_convs)
            self.task_heads.append(sep(in_channels=share_conv_channel, heads=heads, num_cls=num_cls))

    # ------------------------------------------------------------------ forward
    def forward(self, inputs: torch.Tensor | Sequence[torch.Tensor],
                metas: Any = None) -> list[dict[str, torch.Tensor]]:
        """BEV features (B, C, X, Y) → one dict per task of (B, k, X, Y) maps (reg, height, dim, rot, vel,
        heatmap logits)."""
        if not isinstance(inputs, torch.Tensor):
            inputs = inputs[0]
        x = self.shared_conv(inputs)
        return [task(x) for task in self.task_heads]

    # ------------------------------------------------------------------ training
    def get_targets_single(self, gt_boxes: torch.Tensor, gt_labels: torch.Tensor) -> tuple[list, list, list, list]:
        """Per task: heatmap (C_t, X, Y), anno_box (max_objs, 10), ind (max_objs,), mask (max_objs,) for one
        sample of official-layout boxes."""
        cfg = self.train_cfg
        osf = cfg.out_size_factor
        X, Y = cfg.grid_size[0] // osf, cfg.grid_size[1] // osf
        max_objs = cfg.max_objs * cfg.dense_reg
        pcr = torch.tensor(cfg.point_cloud_range, dtype=torch.float32)
        vs = torch.tensor(cfg.voxel_size, dtype=torch.float32)
        boxes = gt_boxes.detach().float().cpu()
        if boxes.shape[1] < 9:
            boxes = torch.nn.functional.pad(boxes, (0, 9 - boxes.shape[1]))
        labels = gt_labels.detach().long().cpu()
        heatmaps, anno_boxes, inds, masks = [], [], [], []
        offset = 0
        for names in self.class_names:
            # boxes of this task, grouped class by class as upstream (affects only the slot order)
            sel = [torch.nonzero(labels == offset + j, as_tuple=False).flatten() for j in range(len(names))]
            idx = torch.cat(sel) if sel else torch.zeros(0, dtype=torch.long)
            task_boxes, task_cls = boxes[idx], labels[idx] - offset
            heatmap = torch.zeros(len(names), X, Y)
            anno = torch.zeros(max_objs, 10)
            ind = torch.zeros(max_objs, dtype=torch.long)
            mask = torch.zeros(max_objs, dtype=torch.uint8)
            for k in range(min(len(task_boxes), max_objs)):
                b = task_boxes[k]
                width, length = b[3] / vs[0] / osf, b[4] / vs[1] / osf
                if not (width > 0 and length > 0):
                    continue
                radius = gaussian_radius((float(length), float(width)), min_overlap=cfg.gaussian_overlap)
                radius = max(cfg.min_radius, int(radius))
                center = torch.stack([(b[0] - pcr[0]) / vs[0] / osf, (b[1] - pcr[1]) / vs[1] / osf])
                cint = center.to(torch.int32)
                cx, cy = int(cint[0]), int(cint[1])
                if not (0 <= cx < X and 0 <= cy < Y):
                    continue
                draw_heatmap_gaussian(heatmap[int(task_cls[k])], (cy, cx), radius)  # row = x, col = y
                ind[k] = cx * Y + cy
                mask[k] = 1
                dims = b[3:6].log() if self.norm_bbox else b[3:6]
                anno[k] = torch.cat([center - cint.float(), (b[2] + b[5] / 2)[None], dims,
                                     torch.sin(b[6])[None], torch.cos(b[6])[None], b[7:9]])
            heatmaps.append(heatmap)
            anno_boxes.append(anno)
            inds.append(ind)
            masks.append(mask)
            offset += len(names)
        return heatmaps, anno_boxes, inds, masks

    def loss(self, gt_bboxes_3d: Sequence[torch.Tensor], gt_labels_3d: Sequence[torch.Tensor],
             preds: Sequence[Mapping[str, torch.Tensor]], **kwargs: Any) -> dict[str, torch.Tensor]:
        """`heatmap/task{i}` and `bbox/task{i}` losses. GT boxes per sample (M, 9) internal; labels (M,)."""
        if self.train_cfg is None:
            raise RuntimeError("CenterHead.loss needs train_cfg")
        device = preds[0]["heatmap"].device
        per_sample = []
        for boxes, labels in zip(gt_bboxes_3d, gt_labels_3d):
            boxes = torch.as_tensor(boxes).float()
            boxes = boxes.reshape(-1, boxes.shape[-1] if boxes.numel() else 9)
            official = internal_to_official(boxes) if len(boxes) else boxes
            per_sample.append(self.get_targets_single(official, torch.as_tensor(labels).reshape(-1)))
        code_weights = self.train_cfg.code_weights
        losses: dict[str, torch.Tensor] = {}
        for t, pred in enumerate(preds):
            heatmap = torch.stack([s[0][t] for s in per_sample]).to(device)
            anno = torch.stack([s[1][t] for s in per_sample]).to(device)
            ind = torch.stack([s[2][t] for s in per_sample]).to(device)
            mask = torch.stack([s[3][t] for s in per_sample]).to(device)
            hm = pred["heatmap"].float().sigmoid().clamp(1e-4, 1 - 1e-4)
            num_pos = float(heatmap.eq(1).sum())
            losses[f"heatmap/task{t}"] = self.loss_cls(hm, heatmap, avg_factor=max(num_pos, 1.0))
            box = torch.cat([pred["reg"], pred["height"], pred["dim"], pred["rot"], pred["vel"]], dim=1).float()
            box = box.flatten(2).gather(2, ind[:, None, :].expand(-1, box.shape[1], -1)).permute(0, 2, 1)
            weights = mask[..., None].float().expand_as(anno) * (~torch.isnan(anno)).float()
            if code_weights is not None:
                weights = weights * weights.new_tensor([float(v) for v in code_weights])
            target = torch.nan_to_num(anno, nan=0.0)
            num = mask.float().sum()
            losses[f"bbox/task{t}"] = self.loss_bbox(box, target, weights, avg_factor=num + 1e-4)
        return losses

    # ------------------------------------------------------------------ inference
    @torch.no_grad()
    def get_bboxes(self, preds: Sequence[Mapping[str, torch.Tensor]], metas: Any = None
                   ) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Per sample (boxes (K, 9) internal convention, scores (K,), labels (K,) long in the global order)."""
        cfg = self.test_cfg
        num_tasks = len(preds)
        nms_types = list(cfg.nms_type) if isinstance(cfg.nms_type, tuple) else [cfg.nms_type] * num_tasks
        scales = cfg.nms_scale
        if scales is None:
            scales = [[1.0] * n for n in self.num_classes]
        elif not isinstance(scales, (list, tuple)):
            scales = [[float(scales)] * n for n in self.num_classes]
        per_task = []
        for t, pred in enumerate(preds):
            pred = {k: v.float() for k, v in pred.items()}
            heat = pred["heatmap"].sigmoid()
            dim = pred["dim"].exp() if self.norm_bbox else pred["dim"]
            decoded = self.bbox_coder.decode(heat, pred["rot"][:, 0:1], pred["rot"][:, 1:2], pred["height"], dim,
                                             pred.get("vel"), reg=pred.get("reg"), task_id=t)
            results = []
            for d in decoded:
                if nms_types[t] == "circle":
                    keep = circle_nms(d["bboxes"][:, :2], d["scores"], cfg.min_radius[t], post_max=cfg.post_max_size)
                    results.append({k: v[keep] for k, v in d.items()})
                else:
                    results.append(self._task_nms(d, scales[t]))
            per_task.append(results)
        out = []
        for i in range(len(per_task[0])):
            boxes = torch.cat([r[i]["bboxes"] for r in per_task])
            scores = torch.cat([r[i]["scores"] for r in per_task])
            offsets = np.cumsum([0] + self.num_classes[:-1])
            labels = torch.cat([r[i]["labels"].long() + int(o) for r, o in zip(per_task, offsets)])
            boxes = boxes.clone()
            boxes[:, 2] = boxes[:, 2] - boxes[:, 5] * 0.5  # gravity centre → official z (= our centre)
            if boxes.shape[1] == 7:
                boxes = torch.nn.functional.pad(boxes, (0, 2))
            out.append((official_to_internal(boxes.float()), scores.float(), labels))
        return out

    def _task_nms(self, d: Mapping[str, torch.Tensor], scale: Sequence[float]) -> dict[str, torch.Tensor]:
        """Score threshold, class-scaled rotated BEV NMS, then the post-centre filter (upstream
        `get_task_detections`)."""
        cfg = self.test_cfg
        boxes, scores, labels = d["bboxes"], d["scores"], d["labels"].long()
        thr = cfg.score_threshold
        if thr > 0:
            keep = scores >= thr
            boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
        if len(scores):
            bev = official_to_internal(boxes[:, :7].double())
            for c, s in enumerate(scale):
                bev[labels == c, 3:5] *= float(s)
            # float64 IoU, union clamped at 1e-8 m² as mmdet3d's nms_gpu (iou_bev) does
            sel = nms_bev(bev, scores, cfg.nms_thr, pre_max=cfg.pre_max_size, post_max=cfg.post_max_size,
                          min_union=1e-8)
            boxes, scores, labels = boxes[sel], scores[sel], labels[sel]
        rng = cfg.post_center_limit_range
        if rng is not None and len(rng) and len(boxes):
            r = boxes.new_tensor([float(v) for v in rng])
            keep = (boxes[:, :3] >= r[:3]).all(1) & (boxes[:, :3] <= r[3:]).all(1)
            boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
        return {"bboxes": boxes, "scores": scores, "labels": labels}
