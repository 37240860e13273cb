"""The input pipeline: transforms under their official `type` names, composed from a config list.

A sample travels through the pipeline as one dict. Keys, frames and conventions (every transform
keeps them consistent; a transform that moves the LiDAR frame updates `lidar_aug_matrix`, one that
changes images updates `img_aug_matrix`):

Set by the dataset (`NuScenesDataset.get_data_info`):
    token (str)               sample token; `sample_idx` the same
    timestamp (float)         seconds
    location (str)            map name of the log
    lidar_path (str)          keyframe point file; `sweeps` (list of dicts, newest first, info format)
    image_paths (list[str])   6 files in camera order (CAM_FRONT, CAM_FRONT_RIGHT, CAM_FRONT_LEFT,
                              CAM_BACK, CAM_BACK_LEFT, CAM_BACK_RIGHT)
    lidar2ego, ego2global     (4, 4) float64
    camera_intrinsics         (6, 4, 4) float64, K in the upper-left 3×3
    camera2lidar, lidar2camera, lidar2image, camera2ego   (6, 4, 4) float64; lidar2image = K·lidar2camera
    lidar_aug_matrix          (4, 4) float64, identity until a 3D augmentation changes it:
                              p_augmented = lidar_aug_matrix @ p_lidar (homogeneous)
    ann_info                  (not in test mode) dict with gt_bboxes_3d (M, 9) float64 internal
                              convention (see bevfusion.structures.boxes), gt_labels_3d (M,) int64
                              (-1 for names outside the classes), gt_names (M,) str
    camera_mask               (6,) bool, False for a camera dropped on purpose (the image loader
                              also sets False for a missing file under missing_sensors="drop")
    drop_lidar (bool), max_sweeps (int | None), missing_sensors ("error" | "drop")
                              sensor dropout requests (bevfusion.datasets.dropout)
    dropped                   the dropout record the loaders fill in (→ metas["dropped"])
Added by loading transforms:
    points                    (N, 5) float32 in the (augmented) LiDAR frame: x, y, z, intensity,
                              time lag in seconds (0 for the keyframe); (0, 5) without LiDAR
    img                       list of 6 PIL RGB images (black stand-ins for dropped cameras); after
                              ImageNormalize a float32 tensor (6, 3, H, W)
    ori_shape                 (W, H) of the original images
    gt_bboxes_3d, gt_labels_3d, gt_names   copied out of ann_info by LoadAnnotations3D
    img_aug_matrix            (6, 4, 4) float64: augmented pixel = img_aug_matrix @ (u, v, 1, 1)
                              of the original pixel (identity until ImageAug3D)
    gt_masks_bev              (num_map_classes, X, Y) uint8, BEV cells indexed [x, y] in the
                              augmented LiDAR frame (LoadBEVSegmentation)
Formatting (DefaultFormatBundle3D, Collect3D) turns arrays into tensors and keeps the listed keys;
`collate` (bevfusion.datasets.collate) stacks samples into the batch the model takes.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

from bevfusion.registry import Registry, RegistryError

__all__ = ["Compose", "TRANSFORMS", "build_transform"]

# Official pipeline `type` names → our classes ("module:attribute", imported on first use).
TRANSFORMS = Registry("transform", {
    "LoadMultiViewImageFromFiles": "bevfusion.datasets.transforms.loading:LoadMultiViewImageFromFiles",
    "LoadPointsFromFile": "bevfusion.datasets.transforms.loading:LoadPointsFromFile",
    "LoadPointsFromMultiSweeps": "bevfusion.datasets.transforms.loading:LoadPointsFromMultiSweeps",
    "LoadAnnotations3D": "bevfusion.datasets.transforms.loading:LoadAnnotations3D",
    "ObjectPaste": "bevfusion.datasets.transforms.object_paste:ObjectPaste",
    "ImageAug3D": "bevfusion.datasets.transforms.augment:ImageAug3D",
    "GlobalRotScaleTrans": "bevfusion.datasets.transforms.augment:GlobalRotScaleTrans",
    "LoadBEVSegmentation": "bevfusion.datasets.transforms.bev_seg:LoadBEVSegmentation",
    "RandomFlip3D": "bevfusion.datasets.transforms.augment:RandomFlip3D",
    "PointsRangeFilter": "bevfusion.datasets.transforms.augment:PointsRangeFilter",
    "ObjectRangeFilter": "bevfusion.datasets.transforms.augment:ObjectRangeFilter",
    "ObjectNameFilter": "bevfusion.datasets.transforms.augment:ObjectNameFilter",
    "PointShuffle": "bevfusion.datasets.transforms.augment:PointShuffle",
    "ImageNormalize": "bevfusion.datasets.transforms.augment:ImageNormalize",
    "GridMask": "bevfusion.datasets.transforms.augment:GridMask",
    "DefaultFormatBundle3D": "bevfusion.datasets.transforms.formatting:DefaultFormatBundle3D",
    "Collect3D": "bevfusion.datasets.transforms.formatting:Collect3D",
})


def build_transform(cfg: Mapping[str, Any], path: str = "pipeline") -> Callable[[dict], dict | None]:
    return TRANSFORMS.build(cfg, path)


class Compose:
    """Apply transforms in order; a transform returning None drops the sample (returns None)."""

    def __init__(self, transforms: Sequence[Mapping[str, Any] | Callable[[dict], dict | None]],
                 path: str = "pipeline"):
        self.transforms = []
        for i, t in enumerate(transforms):
            if isinstance(t, Mapping):
                t = build_transform(t, f"{path}[{i}]")
            elif not callable(t):
                raise RegistryError(f"{path}[{i}]: expected a mapping with a 'type' or a callable, got {t!r}")
            self.transforms.append(t)

    def __call__(self, results: dict) -> dict | None:
        for t in self.transforms:
            results = t(results)
            if results is None:
                return None
        return results

    def __repr__(self) -> str:
        return "Compose(\n" + "".join(f"  {t!r}\n" for t in self.transforms) + ")"
