"""The BEVFusion container: encoders → fuser → decoder → heads, with the official module tree.

Camera-only, LiDAR-only and fused models, with a detection head, a map head or both, are this one
class with parts left out (`encoders.camera: null`, `fuser: null`, `heads.map: null`, ...). The class takes
finished modules (`CameraEncoder`, `LidarEncoder`, a fuser, `Decoder`, heads); `BEVFusion.from_config`
builds them from the official `model` section through the registry, in architecture order, so a bad key
fails with its path (`model.encoders.camera.vtransform: unknown key ...`).

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

from bevfusion.registry import RegistryError, build, check_keys

__all__ = ["BEVFusion", "CameraEncoder", "LidarEncoder", "Decoder", "CAMERA_GEOMETRY"]

CAMERA_GEOMETRY = ("camera2ego", "lidar2ego", "lidar2camera", "lidar2image", "camera_intrinsics", "camera2lidar",
                "img_aug_matrix", "lidar_aug_matrix")


class CameraEncoder(nn.Module):
    """Images → camera BEV features: `backbone` (per view) → `neck` → `vtransform` (lift, splat to the grid).

    `camera_mask` (B, N) bool, when given, zeroes the neck features of the views marked False (a dropped or
    missing camera, as in the BEVFusion paper's robustness study): they add nothing to the BEV grid.
    """

    def __init__(self, backbone: nn.Module, neck: nn.Module, vtransform: nn.Module):
        super().__init__()
        self.backbone, self.neck, self.vtransform = backbone, neck, vtransform

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], path: str = "model.encoders.camera") -> "CameraEncoder":
        _check_keys(cfg, ("backbone", "neck", "vtransform"), path)
        return cls(**{part: build(cfg[part], f"{path}.{part}") for part in ("backbone", "neck", "vtransform")})

    def forward(self, img: torch.Tensor, points: Sequence[torch.Tensor], metas: Sequence[dict],
                camera_mask: torch.Tensor | None = None, **geometry: torch.Tensor) -> torch.Tensor:
        B, N, C, H, W = img.shape
        x = self.backbone(img.reshape(B * N, C, H, W))
        x = self.neck(x)
        if not isinstance(x, torch.Tensor):
            x = x[0]
        x = x.reshape(B, N, *x.shape[1:])  # (B, N, C, h, w)
        if camera_mask is not None:
            if tuple(camera_mask.shape) != (B, N):
                raise ValueError(f"camera_mask must be (B, N) = {(B, N)}, got {tuple(camera_mask.shape)}")
            x = x * camera_mask.to(device=x.device, dtype=x.dtype).view(B, N, 1, 1, 1)
        return self.vtransform(x, points, *(geometry[k] for k in CAMERA_GEOMETRY), metas)


class LidarEncoder(nn.Module):
    """Points → LiDAR BEV features: `voxelize` (hard voxels, or `DynamicScatter` means) → sparse `backbone`.

    Args:
        voxelize_reduce: with hard voxels, average the points of each voxel (official default True).
    """

    def __init__(self, voxelize: nn.Module, backbone: nn.Module, voxelize_reduce: bool = True):
        super().__init__()
        self.voxelize, self.backbone = voxelize, backbone
        self.voxelize_reduce = bool(voxelize_reduce)

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], path: str = "model.encoders.lidar") -> "LidarEncoder":
        _check_keys(cfg, ("voxelize", "backbone"), path, optional=("voxelize_reduce",))
        voxelize = dict(cfg["voxelize"])
        # the official rule: hard voxels with a point budget, else dynamic voxels (mean per voxel)
        kind = "Voxelization" if voxelize.get("max_num_points", -1) > 0 else "DynamicScatter"
        voxelize = build({"type": kind, **voxelize}, f"{path}.voxelize")
        backbone = build(cfg["backbone"], f"{path}.backbone")
        return cls(voxelize, backbone, cfg.get("voxelize_reduce", True))

    @torch.no_grad()
    def voxels(self, points: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Per-sample voxelization; coords get the batch index as column 0 → (M, 4) (b, x, y, z)."""
        feats, coords, sizes = [], [], []
        for k, pts in enumerate(points):
            out = self.voxelize(pts.float())
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

    def forward(self, points: Sequence[torch.Tensor]) -> torch.Tensor:
        feats, coords, sizes = self.voxels(points)
        return self.backbone(feats, coords, len(points), sizes=sizes)


class Decoder(nn.Module):
    """BEV decoder: `backbone` (e.g. SECOND) → `neck` (e.g. SECONDFPN); returns one BEV tensor."""

    def __init__(self, backbone: nn.Module, neck: nn.Module):
        super().__init__()
        self.backbone, self.neck = backbone, neck

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], path: str = "model.decoder") -> "Decoder":
        _check_keys(cfg, ("backbone", "neck"), path)
        return cls(build(cfg["backbone"], f"{path}.backbone"), build(cfg["neck"], f"{path}.neck"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.neck(self.backbone(x))
        return x if isinstance(x, torch.Tensor) else x[0]


class BEVFusion(nn.Module):
    """Multi-sensor BEV model (official `BEVFusion`), made of finished modules.

    Args:
        decoder: the BEV decoder (`Decoder`).
        heads: {"object": detection head, "map": segmentation head}; at least one (None entries are skipped).
        camera: the camera encoder (`CameraEncoder`) or None.
        lidar: the LiDAR encoder (`LidarEncoder`) or None.
        fuser: fuses the encoders' BEV features (needed with two encoders), e.g. `ConvFuser`.
        loss_scale: per-head loss multipliers (default 1.0 each).

    `BEVFusion.from_config(section)` builds all of it from the official `model` section (what `build_model`
    does). The module tree, and so every state_dict key, is the official one: `encoders.camera.backbone.*`,
    `encoders.lidar.backbone.*`, `fuser.*`, `decoder.backbone.*`, `decoder.neck.*`, `heads.object.*`, `heads.map.*`.
    """

    def __init__(self, decoder: nn.Module, heads: Mapping[str, nn.Module | None], camera: nn.Module | None = None,
                 lidar: nn.Module | None = None, fuser: nn.Module | None = None,
                 loss_scale: Mapping[str, float] | None = None):
        super().__init__()
        self.encoders = nn.ModuleDict()
        if camera is not None:
            self.encoders["camera"] = camera
        if lidar is not None:
            self.encoders["lidar"] = lidar
        if not self.encoders:
            raise ValueError("encoders: at least one of camera and lidar is needed")
        if len(self.encoders) > 1 and fuser is None:
            raise ValueError("fuser: two encoders need a fuser")
        self.fuser = fuser
        self.decoder = decoder
        self.heads = nn.ModuleDict()
        for name, head in heads.items():
            if head is None:
                continue
            if name not in ("object", "map"):
                raise ValueError(f"heads.{name}: unknown head (expected object or map)")
            self.heads[name] = head
        if not self.heads:
            raise ValueError("heads: at least one of object and map is needed")
        unknown = set(loss_scale or {}) - set(self.heads)
        if unknown:
            raise ValueError(f"loss_scale: no head named {', '.join(sorted(unknown))} (heads: {', '.join(self.heads)})")
        self.loss_scale = {name: 1.0 for name in self.heads}
        self.loss_scale.update({k: float(v) for k, v in (loss_scale or {}).items()})

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], path: str = "model", init_weights: bool = True) -> "BEVFusion":
        """Build every part of an official `model` section, in architecture order (camera encoder, LiDAR
        encoder, fuser, decoder, heads), each through the registry; a bad key fails with its config path.
        `init_weights=False` skips the camera backbone's own init (its pretrained file or random init, and
        the warning about a URL): for a model whose checkpoint is loaded right after."""
        _check_keys(cfg, ("encoders", "decoder", "heads"), path, optional=("fuser", "loss_scale"))
        encoders = cfg["encoders"]
        _check_keys(encoders, (), f"{path}.encoders", optional=("camera", "lidar"))
        heads = cfg["heads"]
        _check_keys(heads, (), f"{path}.heads", optional=("object", "map"))
        camera = encoders.get("camera")
        lidar = encoders.get("lidar")
        if camera is None and lidar is None:
            raise RegistryError(f"{path}.encoders: at least one of camera and lidar is needed")
        if camera is not None and lidar is not None and cfg.get("fuser") is None:
            raise RegistryError(f"{path}.fuser: two encoders need a fuser")
        if all(heads.get(k) is None for k in ("object", "map")):
            raise RegistryError(f"{path}.heads: at least one of object and map is needed")
        parts = {
            "camera": CameraEncoder.from_config(camera, f"{path}.encoders.camera") if camera is not None else None,
            "lidar": LidarEncoder.from_config(lidar, f"{path}.encoders.lidar") if lidar is not None else None,
            "fuser": build(cfg["fuser"], f"{path}.fuser") if cfg.get("fuser") is not None else None,
            "decoder": Decoder.from_config(cfg["decoder"], f"{path}.decoder"),
            "heads": {name: build(heads[name], f"{path}.heads.{name}") if heads.get(name) is not None else None
                      for name in ("object", "map")},
        }
        try:
            model = cls(**parts, loss_scale=cfg.get("loss_scale"))
        except ValueError as exc:
            raise RegistryError(f"{path}.{exc}") from exc
        if init_weights:
            model.init_weights()
        return model

    def init_weights(self) -> None:
        """As upstream, only the camera backbone initialises itself (loads its pretrained file)."""
        if "camera" in self.encoders and hasattr(self.encoders["camera"].backbone, "init_weights"):
            self.encoders["camera"].backbone.init_weights()

    # ------------------------------------------------------------------ encoders
    def extract_camera_features(self, img: torch.Tensor, points: Sequence[torch.Tensor], metas: Sequence[dict],
                                camera_mask: torch.Tensor | None = None, **geometry: torch.Tensor) -> torch.Tensor:
        return self.encoders["camera"](img, points, metas, camera_mask=camera_mask, **geometry)

    def voxelize(self, points: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        return self.encoders["lidar"].voxels(points)

    def extract_lidar_features(self, points: Sequence[torch.Tensor]) -> torch.Tensor:
        return self.encoders["lidar"](points)

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
                geometry = {k: batch[k] for k in CAMERA_GEOMETRY}
                features.append(self.extract_camera_features(batch["img"], points, metas,
                                                             camera_mask=batch.get("camera_mask"), **geometry))
            else:
                features.append(self.extract_lidar_features(points))
        x = self.fuser(features) if self.fuser is not None else features[0]
        x = self.decoder(x)
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


def _check_keys(cfg: Any, required: Sequence[str], path: str, optional: Sequence[str] = ()) -> None:
    """A container section has exactly the expected keys (unknown ones fail with the path and the names)."""
    if not isinstance(cfg, Mapping):
        raise RegistryError(f"{path}: expected a mapping, got {type(cfg).__name__}")
    check_keys(cfg, (*required, *optional), required, path)


def _batch_size(batch: Mapping[str, Any]) -> int:
    if "img" in batch:
        return batch["img"].shape[0]
    return len(batch["points"])
