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

from bevfusion.models.heads.losses import build_loss
from bevfusion.models.heads.transfusion import ConvBNReLU
from bevfusion.models.heads.transfusion_utils import (cfg_get, circle_nms, draw_heatmap_gaussian, gaussian_radius,
                                                      internal_to_official_torch, official_to_internal_torch,
                                                      rotated_nms)

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


class CenterPointBBoxCoder:
    """Decode dense CenterPoint outputs of one task into boxes (official `CenterPointBBoxCoder`).

    Args:
        pc_range: point-cloud range (x_min, y_min, ...). out_size_factor, voxel_size: cell = osf · voxel.
        post_center_range: (x0, y0, z0, x1, y1, z1) filter on the decoded (gravity-centre) box centre.
        max_num: boxes kept per sample and task (top-k over classes × cells).
        score_threshold: keep scores > threshold when truthy.
        code_size: 9 (with velocity).
    """

    def __init__(self, pc_range: Sequence[float], out_size_factor: int, voxel_size: Sequence[float],
                 post_center_range: Sequence[float] | None = None, max_num: int = 100,
                 score_threshold: float | None = None, code_size: int = 9):
        self.pc_range = [float(v) for v in pc_range]
        self.out_size_factor = out_size_factor
        self.voxel_size = [float(v) for v in voxel_size]
        self.post_center_range = None if post_center_range is None else [float(v) for v in post_center_range]
        self.max_num = max_num
        self.score_threshold = score_threshold
        self.code_size = code_size

    @staticmethod
    def _gather(feat: torch.Tensor, inds: torch.Tensor) -> torch.Tensor:
        """feat (B, C, X, Y), inds (B, K) into X·Y → (B, K, C)."""
        flat = feat.flatten(2)  # (B, C, X·Y)
        return flat.gather(2, inds[:, None, :].expand(-1, flat.shape[1], -1)).permute(0, 2, 1)

    def topk(self, scores: torch.Tensor, k: int) -> tuple[torch.Tensor, ...]:
        """Per-class top-k cells, then the top-k of those: scores, cell index, class, x index, y index."""
        B, C, X, Y = scores.shape
        k_cls = min(k, X * Y)
        cls_scores, cls_inds = torch.topk(scores.reshape(B, C, -1), k_cls)  # (B, C, k_cls)
        k_all = min(k, C * k_cls)
        top_scores, top = torch.topk(cls_scores.reshape(B, -1), k_all)
        classes = torch.div(top, k_cls, rounding_mode="floor")
        inds = cls_inds.reshape(B, -1).gather(1, top)
        xs = torch.div(inds, Y, rounding_mode="floor")  # row = x
        ys = inds % Y
        return top_scores, inds, classes, xs, ys

    def decode(self, heat: torch.Tensor, rot_sine: torch.Tensor, rot_cosine: torch.Tensor, hei: torch.Tensor,
               dim: torch.Tensor, vel: torch.Tensor | None, reg: torch.Tensor | None = None,
               task_id: int = -1) -> list[dict[str, torch.Tensor]]:
        """Dense maps (B, *, X, Y) → per sample {"bboxes" (K, 9) official with gravity-centre z, "scores",
        "labels" (task-local class index)}. `dim` is already exp'ed (sizes in metres)."""
        scores, inds, classes, xs, ys = self.topk(heat, self.max_num)
        xs, ys = xs.to(heat.dtype)[..., None], ys.to(heat.dtype)[..., None]
        if reg is not None:
            r = self._gather(reg, inds)
            xs, ys = xs + r[..., 0:1], ys + r[..., 1:2]
        else:
            xs, ys = xs + 0.5, ys + 0.5
        rot = torch.atan2(self._gather(rot_sine, inds), self._gather(rot_cosine, inds))
        xs = xs * self.out_size_factor * self.voxel_size[0] + self.pc_range[0]
        ys = ys * self.out_size_factor * self.voxel_size[1] + self.pc_range[1]
        parts = [xs, ys, self._gather(hei, inds), self._gather(dim, inds), rot]
        if vel is not None:
            parts.append(self._gather(vel, inds))
        boxes = torch.cat(parts, dim=2)
        keep = torch.ones(scores.shape, dtype=torch.bool, device=scores.device)
        if self.post_center_range is not None:
            rng = boxes.new_tensor(self.post_center_range)
            keep &= (boxes[..., :3] >= rng[:3]).all(-1) & (boxes[..., :3] <= rng[3:]).all(-1)
        if self.score_threshold:
            keep &= scores > self.score_threshold
        return [{"bboxes": boxes[i][keep[i]], "scores": scores[i][keep[i]], "labels": classes[i][keep[i]]}
                for i in range(boxes.shape[0])]


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
        self.train_cfg = train_cfg
        self.test_cfg = test_cfg if test_cfg is not None else {}
        self.norm_bbox = norm_bbox
        self.loss_cls = build_loss(loss_cls or {"type": "GaussianFocalLoss", "reduction": "mean"},
                                   "heads.object.loss_cls")
        self.loss_bbox = build_loss(loss_bbox or {"type": "L1Loss", "reduction": "none", "loss_weight": 0.25},
                                    "heads.object.loss_bbox")
        coder = dict(bbox_coder or {}) if not isinstance(bbox_coder, CenterPointBBoxCoder) else None
        if coder is not None:
            kind = coder.pop("type", "CenterPointBBoxCoder")
            if kind != "CenterPointBBoxCoder":
                raise ValueError(f"heads.object.bbox_coder: unsupported type {kind!r} (expected CenterPointBBoxCoder)")
            self.bbox_coder = CenterPointBBoxCoder(**coder)
        else:
            self.bbox_coder = bbox_coder

        self.shared_conv = ConvBNReLU(in_channels, share_conv_channel, 3)
        sep = dict(separate_head or {"type": "SeparateHead", "init_bias": -2.19, "final_kernel": 3})
        kind = sep.pop("type", "SeparateHead")
        if kind != "SeparateHead":
            raise ValueError(f"heads.object.separate_head: unsupported type {kind!r} (expected SeparateHead)")
        common_heads = dict(common_heads or {})
        self.task_heads = nn.ModuleList()
        for num_cls in self.num_classes:
            heads = copy.deepcopy(common_heads)
            heads["heatmap"] = (num_cls, num_heatmap_convs)
            self.task_heads.append(SeparateHead(share_conv_channel, heads, **{**sep, "num_cls": num_cls}))

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
        osf = cfg["out_size_factor"]
        X, Y = int(cfg["grid_size"][0]) // osf, int(cfg["grid_size"][1]) // osf
        max_objs = int(cfg["max_objs"]) * int(cfg_get(cfg, "dense_reg", 1))
        pcr = torch.tensor([float(v) for v in cfg["point_cloud_range"]], dtype=torch.float32)
        vs = torch.tensor([float(v) for v in cfg["voxel_size"]], dtype=torch.float32)
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
                radius = gaussian_radius((float(length), float(width)), min_overlap=cfg["gaussian_overlap"])
                radius = max(int(cfg["min_radius"]), int(radius))
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
            official = internal_to_official_torch(boxes) if len(boxes) else boxes
            per_sample.append(self.get_targets_single(official, torch.as_tensor(labels).reshape(-1)))
        code_weights = cfg_get(self.train_cfg, "code_weights")
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
        nms_types = cfg.get("nms_type", "rotate") if hasattr(cfg, "get") else "rotate"
        nms_types = list(nms_types) if isinstance(nms_types, (list, tuple)) else [nms_types] * num_tasks
        scales = cfg_get(cfg, "nms_scale")
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
                    keep = circle_nms(d["bboxes"][:, :2].cpu().numpy(), d["scores"].cpu().numpy(),
                                      float(cfg["min_radius"][t]), post_max_size=int(cfg["post_max_size"]))
                    keep = torch.as_tensor(keep, dtype=torch.long, device=d["bboxes"].device)
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
            out.append((official_to_internal_torch(boxes.float()), scores.float(), labels))
        return out

    def _task_nms(self, d: Mapping[str, torch.Tensor], scale: Sequence[float]) -> dict[str, torch.Tensor]:
        """Score threshold, class-scaled rotated BEV NMS, then the post-centre filter (upstream
        `get_task_detections`)."""
        cfg = self.test_cfg
        boxes, scores, labels = d["bboxes"], d["scores"], d["labels"].long()
        thr = float(cfg_get(cfg, "score_threshold", 0.0) or 0.0)
        if thr > 0:
            keep = scores >= thr
            boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
        if len(scores):
            bev = official_to_internal_torch(boxes[:, :7].double())
            for c, s in enumerate(scale):
                bev[labels == c, 3:5] *= float(s)
            sel = rotated_nms(bev, scores, float(cfg["nms_thr"]), cfg_get(cfg, "pre_max_size"),
                              cfg_get(cfg, "post_max_size"))
            boxes, scores, labels = boxes[sel], scores[sel], labels[sel]
        rng = cfg_get(cfg, "post_center_limit_range")
        if rng is not None and len(rng) and len(boxes):
            r = boxes.new_tensor([float(v) for v in rng])
            keep = (boxes[:, :3] >= r[:3]).all(1) & (boxes[:, :3] <= r[3:]).all(1)
            boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
        return {"bboxes": boxes, "scores": scores, "labels": labels}
