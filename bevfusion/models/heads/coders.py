"""Box coders of the detection heads: head outputs ↔ boxes in the **official** (old mmdet3d) layout.

    (x, y, z, w, l, h, yaw_mm[, vx, vy]), z = the value the official code calls the box bottom.

The heads work in that layout end to end so that official checkpoints give the same numbers. Official
info files store the geometric-centre z there (the "z quirk", facts §6.3) and the released checkpoints
were trained on that, so `z` here equals our internal centre z; the heads convert at their boundary with
`bevfusion.structures.boxes.official_to_internal` / `internal_to_official`.

* `TransFusionBBoxCoder`: the 10 TransFusion regression targets and their decoding (facts §4.2).
* `CenterPointBBoxCoder`: top-k decoding of the dense CenterPoint maps of one task.
"""
from __future__ import annotations

from typing import Sequence

import torch

__all__ = ["TransFusionBBoxCoder", "CenterPointBBoxCoder"]


class TransFusionBBoxCoder:
    """Encode official boxes to the 10 regression targets and decode head outputs back (facts §4.2).

    Targets: (x - pc_x) / (osf · vx), (y - pc_y) / (osf · vy) in BEV cells, z + h/2 (gravity centre as the
    official code sees it), log w, log l, log h, sin yaw, cos yaw, vx, vy.

    Args:
        pc_range: (x_min, y_min) of the point-cloud range (more values are ignored).
        out_size_factor: BEV cell = out_size_factor voxels.
        voxel_size: (vx, vy) in metres.
        post_center_range: (x0, y0, z0, x1, y1, z1); decoded boxes with a centre outside are dropped
            when decoding with `filter=True`. None keeps all.
        score_threshold: with `filter=True`, keep scores > threshold. As upstream, a falsy value (None or
            0.0) disables the score filter.
        code_size: 10 (with velocity) or 8.
    """

    def __init__(self, pc_range: Sequence[float], out_size_factor: int, voxel_size: Sequence[float],
                 post_center_range: Sequence[float] | None = None, score_threshold: float | None = None,
                 code_size: int = 8):
        if code_size not in (8, 10):
            raise ValueError(f"TransFusionBBoxCoder: code_size must be 8 or 10, got {code_size}")
        self.pc_range = [float(v) for v in pc_range]
        self.out_size_factor = out_size_factor
        self.voxel_size = [float(v) for v in voxel_size]
        self.post_center_range = None if post_center_range is None else [float(v) for v in post_center_range]
        self.score_threshold = score_threshold
        self.code_size = code_size

    def encode(self, boxes: torch.Tensor) -> torch.Tensor:
        """(M, 7 or 9) official boxes → (M, code_size) targets."""
        t = boxes.new_zeros(boxes.shape[0], self.code_size)
        t[:, 0] = (boxes[:, 0] - self.pc_range[0]) / (self.out_size_factor * self.voxel_size[0])
        t[:, 1] = (boxes[:, 1] - self.pc_range[1]) / (self.out_size_factor * self.voxel_size[1])
        t[:, 2] = boxes[:, 2] + boxes[:, 5] * 0.5  # official "bottom" → "gravity centre"
        t[:, 3:6] = boxes[:, 3:6].log()
        t[:, 6] = torch.sin(boxes[:, 6])
        t[:, 7] = torch.cos(boxes[:, 6])
        if self.code_size == 10:
            t[:, 8:10] = boxes[:, 7:9]
        return t

    def decode(self, heatmap: torch.Tensor, rot: torch.Tensor, dim: torch.Tensor, center: torch.Tensor,
               height: torch.Tensor, vel: torch.Tensor | None, filter: bool = False) -> list[dict[str, torch.Tensor]]:
        """Head outputs → per-sample {"bboxes" (K, 7 or 9) official, "scores" (K,), "labels" (K,)}.

        Args:
            heatmap: (B, C, P) class scores; label = argmax over C, score = its value.
            rot: (B, 2, P) (sin, cos). dim: (B, 3, P) log sizes. center: (B, 2, P) BEV cells.
            height: (B, 1, P) gravity-centre z. vel: (B, 2, P) or None.
            filter: apply post_center_range and score_threshold. Inputs are not modified.
        """
        scores, labels = heatmap.max(dim=1)
        cx = center[:, 0:1] * self.out_size_factor * self.voxel_size[0] + self.pc_range[0]
        cy = center[:, 1:2] * self.out_size_factor * self.voxel_size[1] + self.pc_range[1]
        dims = dim.exp()
        z = height - dims[:, 2:3] * 0.5  # "gravity centre" → official "bottom"
        yaw = torch.atan2(rot[:, 0:1], rot[:, 1:2])
        parts = [cx, cy, z, dims, yaw] + ([vel] if vel is not None else [])
        boxes = torch.cat(parts, dim=1).permute(0, 2, 1)  # (B, P, 7 or 9)
        keep = torch.ones(scores.shape, dtype=torch.bool, device=scores.device)
        if filter:
            if self.post_center_range is not None:
                rng = boxes.new_tensor(self.post_center_range)
                keep &= (boxes[..., :3] >= rng[:3]).all(-1) & (boxes[..., :3] <= rng[3:]).all(-1)
            if self.score_threshold:  # upstream: 0.0 disables the filter
                keep &= scores > self.score_threshold
        return [{"bboxes": boxes[i][keep[i]], "scores": scores[i][keep[i]], "labels": labels[i][keep[i]]}
                for i in range(boxes.shape[0])]


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
