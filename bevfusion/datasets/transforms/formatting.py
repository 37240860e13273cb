"""Formatting transforms (official `type` names): arrays become tensors, then the kept keys are collected."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

__all__ = ["DefaultFormatBundle3D", "Collect3D", "MATRIX_KEYS"]

# Per-sample geometry the model needs, kept as float32 tensors by Collect3D when listed in meta_keys.
MATRIX_KEYS = ("camera_intrinsics", "camera2ego", "lidar2ego", "lidar2camera", "camera2lidar", "lidar2image",
               "img_aug_matrix", "lidar_aug_matrix", "ego2global")


def _images_to_tensor(images) -> torch.Tensor:
    """A list of PIL images (or HWC arrays) → uint8 tensor (N, 3, H, W); tensors pass through."""
    if isinstance(images, torch.Tensor):
        return images
    arrays = [np.asarray(im) for im in images]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


class DefaultFormatBundle3D:
    """Turn points, images, boxes, labels and masks into tensors.

    points → float32 (N, C); img → (6, 3, H, W) (float32 if normalised, else uint8); gt_bboxes_3d →
    float32 (M, 9); gt_labels_3d → int64 (M,); gt_masks_bev → int64 (C, X, Y); camera_mask → bool (6,).
    """

    def __init__(self, classes: Sequence[str] | None = None, with_gt: bool = True, with_label: bool = True):
        self.classes = list(classes) if classes is not None else None
        self.with_gt, self.with_label = with_gt, with_label

    def __call__(self, results: dict) -> dict:
        if "points" in results:
            results["points"] = torch.as_tensor(np.ascontiguousarray(results["points"]), dtype=torch.float32)
        if "img" in results:
            results["img"] = _images_to_tensor(results["img"])
        if self.with_gt and "gt_bboxes_3d" in results:
            results["gt_bboxes_3d"] = torch.as_tensor(np.asarray(results["gt_bboxes_3d"]),
                                                      dtype=torch.float32).reshape(-1, 9)
        if self.with_label and "gt_labels_3d" in results:
            results["gt_labels_3d"] = torch.as_tensor(np.asarray(results["gt_labels_3d"]), dtype=torch.int64)
        if "gt_masks_bev" in results:
            results["gt_masks_bev"] = torch.as_tensor(np.asarray(results["gt_masks_bev"]), dtype=torch.int64)
        if "camera_mask" in results:
            results["camera_mask"] = _camera_mask(results["camera_mask"])
        return results

    def __repr__(self) -> str:
        return "DefaultFormatBundle3D()"


def _camera_mask(mask) -> torch.Tensor:
    return torch.as_tensor(np.asarray(mask, dtype=bool), dtype=torch.bool)


class Collect3D:
    """Keep `keys` (data) and `meta_keys` (geometry matrices as tensors, everything else in `metas`).

    `camera_mask` ((N,) bool, False for a camera left out by sensor dropout) is always kept when the
    sample has one, and the dropout record goes to `metas["dropped"]` (bevfusion.datasets.dropout).
    """

    def __init__(self, keys: Sequence[str], meta_keys: Sequence[str] = (
            "camera_intrinsics", "camera2ego", "lidar2ego", "lidar2camera", "camera2lidar", "lidar2image",
            "img_aug_matrix", "lidar_aug_matrix"), meta_lis_keys: Sequence[str] = ()):
        self.keys, self.meta_keys = list(keys), list(meta_keys)
        self.meta_lis_keys = list(meta_lis_keys)

    def __call__(self, results: dict) -> dict:
        out: dict = {}
        for key in self.keys:
            if key not in results:
                raise KeyError(f"sample {results.get('token', '?')}: Collect3D key {key!r} was not produced by "
                               "the pipeline")
            out[key] = results[key]
        for key in self.meta_keys:
            if key not in results:
                continue
            if key in MATRIX_KEYS:
                out[key] = torch.as_tensor(np.asarray(results[key]), dtype=torch.float32)
        if "camera_mask" in results:
            out["camera_mask"] = _camera_mask(results["camera_mask"])
        metas = {k: results[k] for k in ("token", "timestamp", "location", "lidar2ego", "ego2global",
                                           "ori_shape", "lidar_path", "dropped") if k in results}
        metas.update({k: results[k] for k in self.meta_lis_keys if k in results})
        out["metas"] = metas
        return out

    def __repr__(self) -> str:
        return f"Collect3D(keys={self.keys})"
