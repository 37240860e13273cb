"""The BEVFusion container: encoders → fuser → decoder → heads, with the official module tree.

Camera-only, LiDAR-only and fused models, with a detection head, a map head or both, are this one
class with parts left out by config (`encoders.camera: null`, `fuser: null`, `heads.map: null`, ...).
Children are built from their config sections through the registry, in architecture order, so a bad
key fails with its path (`model.encoders.camera.vtransform: unknown key ...`).

Head contract (the official one): an object head is called `head(x, metas)` → predictions, then
`head.loss(gt_bboxes_3d, gt_labels_3d, predictions)` → named losses in training or
`head.get_bboxes(predictions, metas)` → per-sample (boxes [K, 9], scores [K], labels [K]) in eval;
a map head is called `head(x, gt_masks_bev)` → named losses in training, `head(x)` → probabilities
(B, C, 200, 200) in eval.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch import nn

from bevfusion.registry import build

__all__ = ["BEVFusion"]

_CAMERA_META = ("camera2ego", "lidar2ego", "lidar2camera", "lidar2image", "camera_intrinsics", "camera2lidar",
                "img_aug_matrix", "lidar_aug_matrix")


class BEVFusion(nn.Module):
    """Multi-sensor BEV model (official `BEVFusion`).

    Args:
        encoders: {"camera": {backbone, neck, vtransform} or None, "lidar": {voxelize, backbone,
            voxelize_reduce} or None}.
        fuser: config of the fuser (needed with two encoders) or None.
        decoder: {backbone, neck}.
        heads: {"object": config or None, "map": config or None}.
        loss_scale: per-head loss multipliers (default 1.0 each).
    """

    def __init__(self, encoders: Mapping[str, Any], decoder: Mapping[str, Any], heads: Mapping[str, Any],
                 fuser: Mapping[str, Any] | None = None, loss_scale: Mapping[str, float] | None = None,
                 type: str | None = None, path: str = "model"):
        super().__init__()
        self.encoders = nn.ModuleDict()
        camera = encoders.get("camera")
        if camera is not None:
            self.encoders["camera"] = nn.ModuleDict({
                part: build(camera[part], f"{path}.encoders.camera.{part}")
                for part in ("backbone", "neck", "vtransform")
            })
        lidar = encoders.get("lidar")
        self.voxelize_reduce = True
        if lidar is not None:
            voxelize_cfg = dict(lidar["voxelize"])
            kind = "Voxelization" if voxelize_cfg.get("max_num_points", -1) > 0 else "DynamicScatter"
            self.encoders["lidar"] = nn.ModuleDict({
                "voxelize": build({"type": kind, **voxelize_cfg}, f"{path}.encoders.lidar.voxelize"),
                "backbone": build(lidar["backbone"], f"{path}.encoders.lidar.backbone"),
            })
            self.voxelize_reduce = bool(lidar.get("voxelize_reduce", True))
        if not self.encoders:
            raise ValueError(f"{path}.encoders: at least one of camera and lidar is needed")
        if len(self.encoders) > 1 and fuser is None:
            raise ValueError(f"{path}.fuser: two encoders need a fuser")
        self.fuser = build(fuser, f"{path}.fuser") if fuser is not None else None
        self.decoder = nn.ModuleDict({
            "backbone": build(decoder["backbone"], f"{path}.decoder.backbone"),
            "neck": build(decoder["neck"], f"{path}.decoder.neck"),
        })
        self.heads = nn.ModuleDict()
        for name, head_cfg in heads.items():
            if head_cfg is None:
                continue
            if name not in ("object", "map"):
                raise ValueError(f"{path}.heads.{name}: unknown head (expected object or map)")
            self.heads[name] = build(head_cfg, f"{path}.heads.{name}")
        if not self.heads:
            raise ValueError(f"{path}.heads: at least one of object and map is needed")
        self.loss_scale = {name: 1.0 for name in self.heads}
        self.loss_scale.update(loss_scale or {})
        self.init_weights()

    def init_weights(self) -> None:
        """As upstream, only the camera backbone initialises itself (loads its pretrained file)."""
        if "camera" in self.encoders and hasattr(self.encoders["camera"]["backbone"], "init_weights"):
            self.encoders["camera"]["backbone"].init_weights()

    # ------------------------------------------------------------------ encoders
    def extract_camera_features(self, img: torch.Tensor, points: Sequence[torch.Tensor], metas: Sequence[dict],
                                **geometry: torch.Tensor) -> torch.Tensor:
        B, N, C, H, W = img.shape
        x = self.encoders["camera"]["backbone"](img.reshape(B * N, C, H, W))
        x = self.encoders["camera"]["neck"](x)
        if not isinstance(x, torch.Tensor):
            x = x[0]
        x = x.reshape(B, N, *x.shape[1:])  # (B, N, C, h, w)
        return self.encoders["camera"]["vtransform"](x, points, *(geometry[k] for k in _CAMERA_META), metas)

    @torch.no_grad()
    def voxelize(self, points: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Per-sample voxelization; coords get the batch index as column 0 → (M, 4) (b, x, y, z)."""
        feats, coords, sizes = [], [], []
        for k, pts in enumerate(points):
            out = self.encoders["lidar"]["voxelize"](pts.float())
            f, c = out[0], out[1]
            feats.append(f)
            coords.append(torch.nn.functional.pad(c, (1, 0), value=k))
            if len(out) == 3:
                sizes.append(out[2])
        feats, coords = torch.cat(feats), torch.cat(coords)
        size = torch.cat(sizes) if sizes else None
        if size is not None and self.voxelize_reduce:
            feats = feats.sum(dim=1) / size.clamp(min=1).type_as(feats).view(-1, 1)
        return feats.contiguous(), coords, size

    def extract_lidar_features(self, points: Sequence[torch.Tensor]) -> torch.Tensor:
        feats, coords, sizes = self.voxelize(points)
        return self.encoders["lidar"]["backbone"](feats, coords, len(points), sizes=sizes)

    # ------------------------------------------------------------------ forward
    def forward(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor] | list[dict[str, torch.Tensor]]:
        """Named losses in training (`loss/<head>/<name>`, `stats/<head>/<name>`), else one dict per sample
        with `boxes_3d` (K, 9) (x, y, z, dx, dy, dz, yaw, vx, vy), `scores_3d`, `labels_3d` and/or
        `masks_bev` (C, 200, 200) probabilities."""
        points = batch.get("points")
        metas = batch.get("metas") or [{} for _ in range(_batch_size(batch))]
        features = []
        order = list(self.encoders.keys())
        # Upstream runs LiDAR first in eval ("avoid OOM") and restores the order; the result is the same.
        for sensor in order:
            if sensor == "camera":
                geometry = {k: batch[k] for k in _CAMERA_META}
                features.append(self.extract_camera_features(batch["img"], points, metas, **geometry))
            else:
                features.append(self.extract_lidar_features(points))
        x = self.fuser(features) if self.fuser is not None else features[0]
        x = self.decoder["backbone"](x)
        x = self.decoder["neck"](x)
        if not isinstance(x, torch.Tensor):
            x = x[0]
        if self.training:
            return self._losses(x, batch, metas)
        return self._predict(x, metas)

    def _losses(self, x: torch.Tensor, batch: Mapping[str, Any], metas) -> dict[str, torch.Tensor]:
        outputs: dict[str, torch.Tensor] = {}
        for name, head in self.heads.items():
            if name == "object":
                preds = head(x, metas)
                losses = head.loss(batch["gt_bboxes_3d"], batch["gt_labels_3d"], preds)
            else:
                losses = head(x, batch["gt_masks_bev"])
            for key, value in losses.items():
                if isinstance(value, torch.Tensor) and value.requires_grad:
                    outputs[f"loss/{name}/{key}"] = value * self.loss_scale[name]
                else:
                    # on the model's device: the trainer stacks every logged value into one tensor
                    outputs[f"stats/{name}/{key}"] = torch.as_tensor(value, device=x.device).detach()
        return outputs

    def _predict(self, x: torch.Tensor, metas) -> list[dict[str, torch.Tensor]]:
        outputs: list[dict[str, torch.Tensor]] = [{} for _ in range(x.shape[0])]
        for name, head in self.heads.items():
            if name == "object":
                for k, (boxes, scores, labels) in enumerate(head.get_bboxes(head(x, metas), metas)):
                    outputs[k].update(boxes_3d=boxes.detach().cpu(), scores_3d=scores.detach().cpu(),
                                      labels_3d=labels.detach().cpu())
            else:
                masks = head(x)
                for k in range(x.shape[0]):
                    outputs[k]["masks_bev"] = masks[k].detach().cpu()
        return outputs


def _batch_size(batch: Mapping[str, Any]) -> int:
    if "img" in batch:
        return batch["img"].shape[0]
    return len(batch["points"])
