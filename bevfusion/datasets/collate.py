"""Stack formatted samples into the batch the model takes.

Batch keys: `img` (B, 6, 3, H, W); per-camera matrices (B, 6, 4, 4); `camera_mask` (B, 6) bool (False:
the camera was left out by sensor dropout and its image is a black stand-in); `lidar2ego`,
`lidar_aug_matrix` (B, 4, 4); `gt_masks_bev` (B, C, X, Y); `points`, `gt_bboxes_3d`, `gt_labels_3d` as
lists (one tensor per sample, lengths differ; a sample without LiDAR has (0, C) points); `metas` a list
of dicts (`metas[b]["dropped"]`: what sensor dropout left out, bevfusion.datasets.dropout).
"""
from __future__ import annotations

from typing import Sequence

import torch

__all__ = ["collate", "LIST_KEYS"]

LIST_KEYS = ("points", "gt_bboxes_3d", "gt_labels_3d", "metas")


def collate(samples: Sequence[dict]) -> dict:
    if not samples:
        raise ValueError("cannot collate an empty batch")
    keys = samples[0].keys()
    for i, s in enumerate(samples[1:], 1):
        if s.keys() != keys:
            raise ValueError(f"batch sample {i} has keys {sorted(s)}, sample 0 has {sorted(keys)}")
    batch: dict = {}
    for key in keys:
        values = [s[key] for s in samples]
        if key in LIST_KEYS or not isinstance(values[0], torch.Tensor):
            batch[key] = values
        else:
            shapes = {tuple(v.shape) for v in values}
            if len(shapes) != 1:
                raise ValueError(f"cannot stack {key!r}: shapes differ across the batch {sorted(shapes)}")
            batch[key] = torch.stack(values)
    return batch
