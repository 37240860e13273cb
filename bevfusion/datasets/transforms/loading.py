"""Loading transforms (official `type` names): images, points, multi-sweep points, annotations.

File errors name the file and the sample token. Paths stored in info files are used as they are when
they exist, otherwise resolved against the dataset root from their `samples/` or `sweeps/` part, so
info files written on another machine (or by the official converter) still load.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

__all__ = [
    "resolve_data_path",
    "load_points",
    "append_sweeps",
    "load_multisweep_points",
    "select_sweeps",
    "LoadPointsFromFile",
    "LoadPointsFromMultiSweeps",
    "LoadMultiViewImageFromFiles",
    "LoadAnnotations3D",
]

_DATA_DIRS = ("samples", "sweeps")


def resolve_data_path(path: str, dataset_root: str | os.PathLike | None, sample_token: str = "?") -> str:
    """Return an existing file for an info-file path, or raise FileNotFoundError naming both."""
    if os.path.isfile(path):
        return path
    tried = [path]
    if dataset_root is not None:
        parts = Path(path).parts
        for i in range(len(parts) - 1, -1, -1):
            if parts[i] in _DATA_DIRS:
                candidate = os.path.join(os.fspath(dataset_root), *parts[i:])
                if os.path.isfile(candidate):
                    return candidate
                tried.append(candidate)
                break
    raise FileNotFoundError(f"sample {sample_token}: file {' or '.join(dict.fromkeys(tried))} is missing")


def load_points(path: str, load_dim: int = 5, sample_token: str = "?") -> np.ndarray:
    """Read a `.pcd.bin` / `.bin` file of float32 rows of `load_dim` values."""
    data = np.fromfile(path, dtype=np.float32)
    if data.size % load_dim:
        raise ValueError(f"sample {sample_token}: point file {path} has {data.size} float32 values, "
                         f"not a multiple of the point dimension {load_dim}")
    return data.reshape(-1, load_dim)


def _use_columns(points: np.ndarray, use_dim: int | Sequence[int]) -> np.ndarray:
    cols = list(range(use_dim)) if isinstance(use_dim, int) else list(use_dim)
    if max(cols) >= points.shape[1]:
        raise ValueError(f"use_dim {use_dim} needs more columns than the {points.shape[1]} loaded")
    return points[:, cols]


def _remove_close(points: np.ndarray, radius: float = 1.0) -> np.ndarray:
    """Drop points with |x| < radius and |y| < radius (the ego vehicle's roof)."""
    keep = ~((np.abs(points[:, 0]) < radius) & (np.abs(points[:, 1]) < radius))
    return points[keep]


def select_sweeps(num_available: int, sweeps_num: int, deterministic: bool,
                  rng: np.random.Generator | None = None) -> list[int]:
    """Which stored sweeps to use (indices into the newest-first list).

    All of them when there are at most `sweeps_num`; otherwise `sweeps_num` drawn at random without
    replacement (official behaviour, also at test time upstream) or, with `deterministic`, the newest
    `sweeps_num` (our test-time behaviour: evaluation must be repeatable).
    """
    if num_available <= sweeps_num:
        return list(range(num_available))
    if deterministic:
        return list(range(sweeps_num))
    rng = rng or np.random.default_rng()
    return sorted(rng.choice(num_available, sweeps_num, replace=False).tolist())


def append_sweeps(key: np.ndarray, sweeps: Sequence[dict], timestamp: float,
                  dataset_root: str | os.PathLike | None, sweeps_num: int = 9, load_dim: int = 5,
                  use_dim: int | Sequence[int] = 5, deterministic: bool = True, pad_empty_sweeps: bool = True,
                  remove_close: bool = True, rng: np.random.Generator | None = None,
                  sample_token: str = "?") -> np.ndarray:
    """Keyframe points plus sweeps in the keyframe LiDAR frame; column 4 becomes the time lag (s).

    `key` is the keyframe cloud (at least 5 columns); `sweeps` are info-file sweep records, newest
    first. Sweep points within 1 m of the sensor in x and y are dropped (`remove_close`), the rest are
    moved by their sensor2lidar transform. With no sweeps and `pad_empty_sweeps`, the keyframe is
    repeated `sweeps_num` times.
    """
    if key.shape[1] < 5:
        raise ValueError(f"sample {sample_token}: multi-sweep loading needs 5 point columns, got {key.shape[1]}")
    key = key.copy()
    key[:, 4] = 0.0  # the keyframe's ring index becomes its time lag, 0
    clouds = [key]
    if not sweeps and pad_empty_sweeps:
        pad = _remove_close(key) if remove_close else key
        clouds.extend(pad.copy() for _ in range(sweeps_num))
    ts = _seconds(timestamp)
    for i in select_sweeps(len(sweeps), sweeps_num, deterministic, rng):
        sweep = sweeps[i]
        pts = load_points(resolve_data_path(sweep["data_path"], dataset_root, sample_token), load_dim, sample_token)
        pts = _use_columns(pts, use_dim).copy()
        if remove_close:
            pts = _remove_close(pts)
        R = np.asarray(sweep["sensor2lidar_rotation"], dtype=np.float64)
        t = np.asarray(sweep["sensor2lidar_translation"], dtype=np.float64)
        pts[:, :3] = (pts[:, :3].astype(np.float64) @ R.T + t).astype(np.float32)
        pts[:, 4] = ts - _seconds(sweep["timestamp"])
        clouds.append(pts)
    return np.concatenate(clouds, axis=0)


def load_multisweep_points(info: dict[str, Any], dataset_root: str | os.PathLike | None, sweeps_num: int = 9,
                           load_dim: int = 5, use_dim: int | Sequence[int] = 5, deterministic: bool = True,
                           **kwargs) -> np.ndarray:
    """Keyframe plus sweeps of an info record (`lidar_path`, `token`, `timestamp`, `sweeps`)."""
    token = info.get("token", "?")
    key = load_points(resolve_data_path(info["lidar_path"], dataset_root, token), load_dim, token)
    key = _use_columns(key, use_dim)
    return append_sweeps(key, info.get("sweeps", []), info["timestamp"], dataset_root, sweeps_num, load_dim,
                         use_dim, deterministic, sample_token=token, **kwargs)


def _seconds(timestamp: float) -> float:
    """nuScenes timestamps are µs integers; the pipeline keeps seconds."""
    return float(timestamp) / 1e6 if float(timestamp) > 1e11 else float(timestamp)


class LoadPointsFromFile:
    """Read the keyframe point cloud into `results["points"]` (N, len(use_dim)) float32."""

    def __init__(self, coord_type: str = "LIDAR", load_dim: int = 5, use_dim: int | Sequence[int] = 5,
                 shift_height: bool = False, use_color: bool = False, reduce_beams: int | None = None,
                 load_augmented: str | None = None, dataset_root: str | None = None):
        if coord_type != "LIDAR":
            raise ValueError(f"coord_type {coord_type!r} is not supported (only LIDAR)")
        if shift_height or use_color or load_augmented:
            raise ValueError("shift_height, use_color and load_augmented are not supported")
        self.load_dim, self.use_dim = load_dim, use_dim
        self.reduce_beams = reduce_beams  # 32 (the official value) keeps every beam: a no-op
        self.dataset_root = dataset_root

    def __call__(self, results: dict) -> dict:
        token = results.get("token", "?")
        root = self.dataset_root or results.get("dataset_root")
        path = resolve_data_path(results["lidar_path"], root, token)
        results["points"] = _use_columns(load_points(path, self.load_dim, token), self.use_dim).copy()
        return results

    def __repr__(self) -> str:
        return f"LoadPointsFromFile(load_dim={self.load_dim}, use_dim={self.use_dim})"


class LoadPointsFromMultiSweeps:
    """Append `sweeps_num` previous sweeps to `results["points"]`, motion-compensated, with time lag.

    The keyframe's column 4 becomes 0 and each sweep's becomes keyframe time − sweep time (s). With
    more stored sweeps than `sweeps_num`, training draws them at random (as upstream); in test mode
    (`test_mode=True`, which the dataset sets for its test pipeline) the newest are used, so evaluation
    is repeatable (upstream draws at random at test time too: see docs/COMPATIBILITY.md).
    """

    def __init__(self, sweeps_num: int = 10, load_dim: int = 5, use_dim: int | Sequence[int] = 5,
                 pad_empty_sweeps: bool = False, remove_close: bool = False, test_mode: bool = False,
                 reduce_beams: int | None = None, load_augmented: str | None = None,
                 dataset_root: str | None = None):
        if load_augmented:
            raise ValueError("load_augmented is not supported")
        self.sweeps_num, self.load_dim, self.use_dim = sweeps_num, load_dim, use_dim
        self.pad_empty_sweeps, self.remove_close, self.test_mode = pad_empty_sweeps, remove_close, test_mode
        self.dataset_root = dataset_root

    def __call__(self, results: dict) -> dict:
        results["points"] = append_sweeps(
            results["points"], results.get("sweeps", []), results["timestamp"],
            self.dataset_root or results.get("dataset_root"), self.sweeps_num, self.load_dim, self.use_dim,
            deterministic=self.test_mode or results.get("test_mode", False),
            pad_empty_sweeps=self.pad_empty_sweeps, remove_close=self.remove_close, rng=results.get("rng"),
            sample_token=results.get("token", "?"))
        return results

    def __repr__(self) -> str:
        return f"LoadPointsFromMultiSweeps(sweeps_num={self.sweeps_num}, test_mode={self.test_mode})"


class LoadMultiViewImageFromFiles:
    """Read the 6 camera images (PIL, RGB) in camera order into `results["img"]`."""

    def __init__(self, to_float32: bool = False, color_type: str = "unchanged", dataset_root: str | None = None):
        self.to_float32 = to_float32  # images stay PIL until ImageNormalize; kept for config compatibility
        self.dataset_root = dataset_root

    def __call__(self, results: dict) -> dict:
        from PIL import Image

        token = results.get("token", "?")
        root = self.dataset_root or results.get("dataset_root")
        images = []
        for path in results["image_paths"]:
            path = resolve_data_path(path, root, token)
            try:
                with Image.open(path) as im:
                    images.append(im.convert("RGB"))
            except OSError as exc:
                raise OSError(f"sample {token}: cannot read image {path}: {exc}") from None
        results["img"] = images
        results["ori_shape"] = images[0].size if images else None
        return results

    def __repr__(self) -> str:
        return "LoadMultiViewImageFromFiles()"


class LoadAnnotations3D:
    """Copy boxes and labels out of `results["ann_info"]` (internal box convention, 9 values)."""

    def __init__(self, with_bbox_3d: bool = True, with_label_3d: bool = True, with_attr_label: bool = False,
                 with_bbox: bool = False, with_label: bool = False, with_mask_3d: bool = False,
                 with_seg_3d: bool = False):
        if with_attr_label or with_bbox or with_label or with_mask_3d or with_seg_3d:
            raise ValueError("only 3D boxes and labels are supported")
        self.with_bbox_3d, self.with_label_3d = with_bbox_3d, with_label_3d

    def __call__(self, results: dict) -> dict:
        ann = results.get("ann_info")
        if ann is None:
            if not results.get("test_mode", False):
                raise KeyError(f"sample {results.get('token', '?')}: the info file has no annotations")
            # Test split (no ground truth): empty boxes, so the same test pipeline serves val and test.
            ann = {"gt_bboxes_3d": np.zeros((0, 9)), "gt_labels_3d": np.zeros(0, dtype=np.int64),
                   "gt_names": np.zeros(0, dtype=str)}
        if self.with_bbox_3d:
            results["gt_bboxes_3d"] = ann["gt_bboxes_3d"].copy()
            results["gt_names"] = ann["gt_names"].copy()
        if self.with_label_3d:
            results["gt_labels_3d"] = ann["gt_labels_3d"].copy()
        return results

    def __repr__(self) -> str:
        return "LoadAnnotations3D()"
