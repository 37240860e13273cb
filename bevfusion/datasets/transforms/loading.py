"""Loading transforms (official `type` names): images, points, multi-sweep points, annotations.

File errors name the file and the sample token. Paths stored in info files are used as they are when
they exist, otherwise resolved against the dataset root from their `samples/` or `sweeps/` part, so
info files written on another machine (or by the official converter) still load.

Files are checked as they are read (DataError naming file, sample token and problem):
- point files hold whole points: a size in bytes that is a multiple of 4 · load_dim, at least one
  point (a database object's file may be empty), finite values, and coordinates within ±10 km (a
  float64 file or another layout read as float32 gives far larger values);
- images match their camera matrix: the principal point (cx, cy) of `camera_intrinsics` must lie in
  the central quarter of the image (|cx − W/2| ≤ W/8 and |cy − H/2| ≤ H/8). nuScenes images are
  1600×900 with (cx, cy) within 30 and 52 px of the centre; an image at half or double that size, a
  placeholder or a crop fails. The info file stores no image size, so the camera matrix is what
  implies it.
A missing file raises DataFileNotFoundError unless the sample's `missing_sensors` is "drop"; sensors
can also be dropped on purpose (bevfusion.datasets.dropout).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from bevfusion.datasets.dropout import new_record
from bevfusion.datasets.errors import DataError, DataFileNotFoundError

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
    "check_image_size",
    "dropout_record",
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
    raise DataFileNotFoundError(f"sample {sample_token}: file {' or '.join(dict.fromkeys(tried))} is missing")


# |x|, |y|, |z| beyond this (metres) means the file is not float32 points of `load_dim` values.
MAX_POINT_COORDINATE = 1e4


def load_points(path: str, load_dim: int = 5, sample_token: str = "?", allow_empty: bool = False) -> np.ndarray:
    """Read a `.pcd.bin` / `.bin` file of float32 rows of `load_dim` values, checked (module docstring).

    Returns (N, load_dim) float32; N == 0 only with `allow_empty` (else DataError, as for a size that
    is not whole points, non-finite values or implausible coordinates).
    """
    size = os.path.getsize(path)
    if size % 4:
        raise DataError(f"sample {sample_token}: point file {path} has {size} bytes, not a whole number of "
                        "float32 values (truncated?)")
    data = np.fromfile(path, dtype=np.float32)
    if data.size % load_dim:
        raise DataError(f"sample {sample_token}: point file {path} has {data.size} float32 values, "
                        f"not a multiple of the point dimension {load_dim} (truncated or another layout?)")
    points = data.reshape(-1, load_dim)
    if not len(points):
        if allow_empty:
            return points
        raise DataError(f"sample {sample_token}: point file {path} is empty (no points)")
    # min and max propagate NaN and see inf: one pass each over the data, no temporary arrays.
    lo, hi = float(data.min()), float(data.max())
    if not (np.isfinite(lo) and np.isfinite(hi)):
        row = int(np.argmin(np.isfinite(points).all(axis=1)))
        raise DataError(f"sample {sample_token}: point file {path}: point {row} has NaN or inf values")
    if max(hi, -lo) > MAX_POINT_COORDINATE:  # then look at the coordinates alone
        reach = float(np.abs(points[:, :3]).max())
        if reach > MAX_POINT_COORDINATE:
            raise DataError(f"sample {sample_token}: point file {path}: a coordinate of {reach:.3g} m (limit "
                            f"{MAX_POINT_COORDINATE:g}): not float32 points of {load_dim} values?")
    return points


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
                  sample_token: str = "?", max_sweeps: int | None = None, missing: str = "error",
                  record: dict | None = None) -> np.ndarray:
    """Keyframe points plus sweeps in the keyframe LiDAR frame; column 4 becomes the time lag (s).

    `key` is the keyframe cloud (at least 5 columns); `sweeps` are info-file sweep records, newest
    first. Sweep points within 1 m of the sensor in x and y are dropped (`remove_close`), the rest are
    moved by their sensor2lidar transform. With no sweeps and `pad_empty_sweeps`, the keyframe is
    repeated `sweeps_num` times.

    Sensor dropout (bevfusion.datasets.dropout): `max_sweeps` keeps only the newest k stored sweeps
    before they are chosen (no padding when that leaves none: the keyframe alone); with
    `missing="drop"` a missing sweep file is skipped. Both are counted in the dropout `record`.
    """
    if key.shape[1] < 5:
        raise ValueError(f"sample {sample_token}: multi-sweep loading needs 5 point columns, got {key.shape[1]}")
    record = record if record is not None else new_record()
    key = key.copy()
    key[:, 4] = 0.0  # the keyframe's ring index becomes its time lag, 0
    clouds = [key]
    if not sweeps and pad_empty_sweeps:
        pad = _remove_close(key) if remove_close else key
        clouds.extend(pad.copy() for _ in range(sweeps_num))
    available = sweeps if max_sweeps is None else sweeps[:max_sweeps]
    chosen = select_sweeps(len(available), sweeps_num, deterministic, rng)
    dropped = min(len(sweeps), sweeps_num) - len(chosen)
    record["counts"]["dropped_sweeps"] += dropped
    record["sweeps"] += dropped
    ts = _seconds(timestamp)
    for i in chosen:
        sweep = available[i]
        try:
            path = resolve_data_path(sweep["data_path"], dataset_root, sample_token)
        except FileNotFoundError:
            if missing != "drop":
                raise
            record["counts"]["missing_sweep_files"] += 1
            record["sweeps"] += 1
            continue
        pts = load_points(path, load_dim, sample_token)
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


def _dropout_requested(results: dict) -> bool:
    return (results.get("missing_sensors") == "drop" or bool(results.get("drop_lidar"))
            or results.get("max_sweeps") is not None or "camera_mask" in results)


def dropout_record(results: dict) -> dict:
    """The sample's dropout record, `results["dropped"]`.

    The dataset puts one into every sample when it was given dropout options; without them (and
    without dropout keys in `results`) a throwaway record is returned, so a plain pipeline's output
    keeps exactly its keys.
    """
    record = results.get("dropped")
    if record is None:
        record = new_record()
        if _dropout_requested(results):
            results["dropped"] = record
    return record


class LoadPointsFromFile:
    """Read the keyframe point cloud into `results["points"]` (N, len(use_dim)) float32.

    With `results["drop_lidar"]`, or a missing file under `missing_sensors="drop"`, the points are
    an empty (0, len(use_dim)) array and the dropout record says so. `results["allow_empty_points"]`
    accepts an empty file (database objects).
    """

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
        if results.get("drop_lidar"):
            return self._no_points(results, "dropped_lidar")
        try:
            path = resolve_data_path(results["lidar_path"], root, token)
        except FileNotFoundError:
            if results.get("missing_sensors", "error") != "drop":
                raise
            return self._no_points(results, "missing_lidar_files")
        points = load_points(path, self.load_dim, token, allow_empty=bool(results.get("allow_empty_points")))
        results["points"] = _use_columns(points, self.use_dim).copy()
        return results

    def _no_points(self, results: dict, count: str) -> dict:
        record = dropout_record(results)
        record["lidar"] = True
        record["counts"][count] += 1
        results["points"] = _use_columns(np.zeros((0, self.load_dim), np.float32), self.use_dim).copy()
        return results

    def __repr__(self) -> str:
        return f"LoadPointsFromFile(load_dim={self.load_dim}, use_dim={self.use_dim})"


class LoadPointsFromMultiSweeps:
    """Append `sweeps_num` previous sweeps to `results["points"]`, motion-compensated, with time lag.

    The keyframe's column 4 becomes 0 and each sweep's becomes keyframe time − sweep time (s). With
    more stored sweeps than `sweeps_num`, training draws them at random (as upstream); in test mode
    (`test_mode=True`, which the dataset sets for its test pipeline) the newest are used, so evaluation
    is repeatable (upstream draws at random at test time too: see docs/COMPATIBILITY.md).

    Sensor dropout: nothing is added when the sample has no LiDAR (dropped or its keyframe missing);
    `results["max_sweeps"]` and `results["missing_sensors"]` are passed to `append_sweeps`.
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
        record = dropout_record(results)
        if record["lidar"] or results.get("drop_lidar"):
            return results
        results["points"] = append_sweeps(
            results["points"], results.get("sweeps", []), results["timestamp"],
            self.dataset_root or results.get("dataset_root"), self.sweeps_num, self.load_dim, self.use_dim,
            deterministic=self.test_mode or results.get("test_mode", False),
            pad_empty_sweeps=self.pad_empty_sweeps, remove_close=self.remove_close, rng=results.get("rng"),
            sample_token=results.get("token", "?"), max_sweeps=results.get("max_sweeps"),
            missing=results.get("missing_sensors", "error"), record=record)
        return results

    def __repr__(self) -> str:
        return f"LoadPointsFromMultiSweeps(sweeps_num={self.sweeps_num}, test_mode={self.test_mode})"


class LoadMultiViewImageFromFiles:
    """Read the 6 camera images (PIL, RGB) in camera order into `results["img"]`.

    Each image is checked against its camera matrix (module docstring) unless `check_image_size` is
    false. A camera whose `results["camera_mask"]` entry is False (dropped on purpose), or whose file
    is missing under `missing_sensors="drop"`, gets a black RGB stand-in of its file's size (read from
    the header when the file exists), else of another camera's image of the sample, else twice its
    principal point; its `camera_mask` entry is False and the dropout record names it.
    """

    def __init__(self, to_float32: bool = False, color_type: str = "unchanged", dataset_root: str | None = None,
                 check_image_size: bool = True):
        self.to_float32 = to_float32  # images stay PIL until ImageNormalize; kept for config compatibility
        self.dataset_root = dataset_root
        self.check_image_size = check_image_size

    def __call__(self, results: dict) -> dict:
        from PIL import Image

        token = results.get("token", "?")
        root = self.dataset_root or results.get("dataset_root")
        paths = list(results["image_paths"])
        names = list(results.get("camera_names") or [f"camera {i}" for i in range(len(paths))])
        requested = _dropout_requested(results)
        mask = results.get("camera_mask")
        mask = np.ones(len(paths), dtype=bool) if mask is None else np.array(mask, dtype=bool)
        intrinsics = results.get("camera_intrinsics")
        record = dropout_record(results)
        images: list[Any] = [None] * len(paths)
        for i, path in enumerate(paths):
            if not mask[i]:
                record["cameras"].append(names[i])
                record["counts"]["dropped_cameras"] += 1
                continue
            try:
                path = resolve_data_path(path, root, token)
            except FileNotFoundError:
                if results.get("missing_sensors", "error") != "drop":
                    raise
                mask[i] = False
                record["cameras"].append(names[i])
                record["counts"]["missing_camera_files"] += 1
                continue
            images[i] = self._read(path, token, names[i], None if intrinsics is None else intrinsics[i])
        if not mask.all():
            loaded = next((im.size for im in images if im is not None), None)
            for i in np.flatnonzero(~mask):
                size = _stand_in_size(paths[i], root, token, names[i], loaded,
                                      None if intrinsics is None else intrinsics[i])
                images[i] = Image.new("RGB", size)
        results["img"] = images
        if requested:
            results["camera_mask"] = mask
        results["ori_shape"] = images[0].size if images else None
        return results

    def _read(self, path: str, token: str, name: str, intrinsics: np.ndarray | None):
        from PIL import Image

        try:
            with Image.open(path) as im:
                if self.check_image_size and intrinsics is not None:
                    check_image_size(im.size, intrinsics, path, token, name)
                return im.convert("RGB")
        except OSError as exc:
            raise DataError(f"sample {token}: cannot read image {path}: {exc}") from None

    def __repr__(self) -> str:
        return "LoadMultiViewImageFromFiles()"


def check_image_size(size: tuple[int, int], intrinsics: np.ndarray, path: str, token: str, name: str) -> None:
    """DataError unless the principal point lies in the central quarter of a (W, H) image."""
    W, H = size
    cx, cy = float(intrinsics[0][2]), float(intrinsics[1][2])
    if abs(cx - W / 2) <= W / 8 and abs(cy - H / 2) <= H / 8:
        return
    raise DataError(f"sample {token}: image {path} is {W}x{H}, but cams.{name}.camera_intrinsics puts the "
                    f"principal point at ({cx:.1f}, {cy:.1f}), which implies about {2 * cx:.0f}x{2 * cy:.0f} "
                    "(it must lie within W/8 and H/8 of the image centre): wrong resolution, a crop or another "
                    "camera's image?")


def _stand_in_size(path: str, root: str | None, token: str, name: str, loaded: tuple[int, int] | None,
                   intrinsics: np.ndarray | None) -> tuple[int, int]:
    """(W, H) of the black image standing in for a dropped or missing camera."""
    from PIL import Image

    try:
        with Image.open(resolve_data_path(path, root, token)) as im:
            return im.size  # the header only; nothing is decoded
    except OSError:
        pass
    if loaded is not None:
        return loaded
    if intrinsics is not None:
        return max(1, round(2 * float(intrinsics[0][2]))), max(1, round(2 * float(intrinsics[1][2])))
    raise DataError(f"sample {token}: no size for the stand-in image of camera {name} (its file {path} is "
                    "missing, no other image of the sample was loaded and there is no camera matrix)")


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
