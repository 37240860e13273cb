"""What a drive recording shows, gathered per sample as plain numpy (no rerun here).

`load_results` reads and checks a results file of `tools/test.py --out` against a dataset before
anything is written; `select_samples` picks the samples (scenes, results, a maximum); `load_frame`
gathers one sample: multi-sweep LiDAR points, the six cameras with their calibrations and image
files, GT and predicted boxes, GT and predicted BEV maps. Missing sensor files do not stop a drive:
the frame carries a warning and leaves the item out.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

from bevfusion.datasets.transforms.loading import load_multisweep_points, resolve_data_path
from bevfusion.utils.io import load_pickle
from bevfusion.utils.logging import get_logger

__all__ = ["CameraView", "Frame", "FrameOptions", "MapRasteriser", "load_results", "select_samples", "sample_scenes",
           "load_frame", "BEV_XBOUND", "BEV_YBOUND", "BevCanvas", "bev_quarter_turns"]

log = get_logger("visualization")

# The official map grid: 200 x 200 cells of 0.5 m around the LiDAR (the masks_bev of the map head).
BEV_XBOUND = (-50.0, 50.0, 0.5)
BEV_YBOUND = (-50.0, 50.0, 0.5)

# cos, sin of 0, 90, 180, 270 degrees, exactly
_QUARTER_COS_SIN = ((1, 0), (0, 1), (-1, 0), (0, -1))


def bev_quarter_turns(lidar2ego: np.ndarray) -> int:
    """The quarter turns k (0-3) that turn the LiDAR's BEV axes closest onto the ego's (x forward, y left).

    k = round(heading of the LiDAR x axis in the ego frame / 90°) mod 4: 3 for nuScenes' LIDAR_TOP, whose
    x axis points to the ego's right (its y axis forward).
    """
    R = np.asarray(lidar2ego, dtype=np.float64)[:2, :2]
    return int(np.round(np.arctan2(R[1, 0], R[0, 0]) / (np.pi / 2))) % 4


@dataclass(frozen=True)
class BevCanvas:
    """The pixel grid of the BEV panels: the LiDAR-frame map grid of BEV_XBOUND / BEV_YBOUND turned by
    `turns` quarter turns, so that the ego's forward axis is up and its left is on the left.

    Turning by whole quarter turns keeps the map cells exact (no resampling); the LiDAR's mounting yaw
    left over (about 0.1° on nuScenes) is not corrected. The display frame has axes (forward, left)
    at the LiDAR origin: d = R(turns·90°) · (x, y)_lidar, pixel u (column) = (d_left,max - d_left) / cell,
    v (row) = (d_fwd,max - d_fwd) / cell; the image spans [0, width] x [0, height] (rerun's pixel
    convention: pixel (c, r) covers [c, c+1] x [r, r+1]).
    """

    turns: int = 0

    @classmethod
    def for_lidar(cls, lidar2ego: np.ndarray) -> "BevCanvas":
        return cls(bev_quarter_turns(lidar2ego))

    def rotation(self) -> np.ndarray:
        """(2, 2) int: LiDAR-frame xy → display (forward, left)."""
        c, s = _QUARTER_COS_SIN[self.turns % 4]
        return np.array([[c, -s], [s, c]])

    def _bounds(self) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
        """((fwd min, fwd max, cell), (left min, left max, cell)) of the turned grid."""
        corners = np.array([[BEV_XBOUND[i], BEV_YBOUND[j]] for i in (0, 1) for j in (0, 1)]) @ self.rotation().T
        cells = (BEV_XBOUND[2], BEV_YBOUND[2]) if self.turns % 2 == 0 else (BEV_YBOUND[2], BEV_XBOUND[2])
        lo, hi = corners.min(axis=0), corners.max(axis=0)
        return (lo[0], hi[0], cells[0]), (lo[1], hi[1], cells[1])

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) in pixels."""
        fwd, left = self._bounds()
        return int(round((left[1] - left[0]) / left[2])), int(round((fwd[1] - fwd[0]) / fwd[2]))

    def pixels(self, xy: np.ndarray) -> np.ndarray:
        """LiDAR-frame (..., 2) x, y in metres → (..., 2) float64 pixel (u, v) on the canvas."""
        d = np.asarray(xy, dtype=np.float64) @ self.rotation().T
        fwd, left = self._bounds()
        return np.stack([(left[1] - d[..., 1]) / left[2], (fwd[1] - d[..., 0]) / fwd[2]], axis=-1)

    def masks(self, masks: np.ndarray) -> np.ndarray:
        """(C, X, Y) masks on the BEV_XBOUND / BEV_YBOUND grid → (C, F, L) masks on the display axes
        (forward, left), ready for `colors.bev_map_image` (which puts forward up and left on the left)."""
        return np.rot90(np.asarray(masks), self.turns % 4, axes=(1, 2))


@dataclass
class FrameOptions:
    """What to load per sample.

    Args:
        sweeps_num: LiDAR sweeps added to the keyframe (the newest ones; 0 = keyframe only).
        max_points: keep at most this many points (an even stride over the cloud); None keeps all.
        score_threshold: predicted boxes with a lower score are left out.
        gt_maps: rasterise GT map masks from the map expansion when the results carry none.
        images: log the camera image files (calibrations are logged either way).
    """

    sweeps_num: int = 9
    max_points: int | None = None
    score_threshold: float = 0.3
    gt_maps: bool = True
    images: bool = True


@dataclass
class CameraView:
    """One camera of a sample: `camera2lidar` (4, 4) and `intrinsics` (3, 3) float64, image `size` (w, h)."""

    name: str
    intrinsics: np.ndarray
    camera2lidar: np.ndarray
    size: tuple[int, int]
    image_path: str | None


@dataclass
class Frame:
    """One sample, every array in the sample's LiDAR frame unless its name says otherwise.

    Boxes are (K, 9) in the internal convention (x, y, z centre, dx, dy, dz, yaw, vx, vy); masks are
    (C, X, Y) over BEV_XBOUND / BEV_YBOUND (GT 0/1, predictions probabilities); None means "not
    available" (no prediction, no map), an empty array means "nothing there".
    """

    index: int
    token: str
    timestamp_us: int
    scene: str | None
    lidar2ego: np.ndarray
    ego2global: np.ndarray
    points: np.ndarray | None
    cameras: list[CameraView]
    gt_boxes: np.ndarray | None = None
    gt_names: list[str] = field(default_factory=list)
    pred_boxes: np.ndarray | None = None
    pred_scores: np.ndarray | None = None
    pred_names: list[str] = field(default_factory=list)
    gt_masks: np.ndarray | None = None
    pred_masks: np.ndarray | None = None
    warnings: list[str] = field(default_factory=list)


def _base(dataset):
    return getattr(dataset, "dataset", dataset)


def _as_array(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor (results straight from run_inference)
        value = value.detach().cpu().numpy()
    return np.asarray(value)


def load_results(results: str | os.PathLike | Sequence[Mapping[str, Any]], dataset) -> dict[str, dict[str, Any]]:
    """Check the records of `tools/test.py --out` against `dataset` and index them by sample token.

    Args:
        results: a results pickle path, or the list of records itself.
        dataset: the NuScenesDataset the results were computed on.
    Returns:
        {token: record} with numpy arrays; boxes as (K, 9) float64 (7-column boxes get zero velocity).
    Raises:
        ValueError naming the file and the sample for a malformed record, and when no record belongs
        to the dataset (wrong split or wrong info file). Records of unknown samples are otherwise
        dropped with a warning.
    """
    source = os.fspath(results) if isinstance(results, (str, os.PathLike)) else "<results>"
    records = load_pickle(source) if isinstance(results, (str, os.PathLike)) else results
    if not isinstance(records, (list, tuple)):
        raise ValueError(f"{source}: expected a list of per-sample result dicts, got {type(records).__name__}")
    base = _base(dataset)
    known = {info["token"] for info in base.data_infos}
    n_maps = len(base.map_classes)
    out: dict[str, dict[str, Any]] = {}
    unknown: list[str] = []
    for i, rec in enumerate(records):
        if not isinstance(rec, Mapping) or "token" not in rec:
            raise ValueError(f"{source}: record {i} is not a dict with a 'token'")
        token = str(rec["token"])
        where = f"{source}: sample {token}"
        clean: dict[str, Any] = {"token": token}
        if "boxes_3d" in rec:
            boxes = _as_array(rec["boxes_3d"]).astype(np.float64)
            if boxes.ndim != 2 or boxes.shape[1] < 7:
                raise ValueError(f"{where}: boxes_3d has shape {boxes.shape}, expected (K, 7) or (K, 9)")
            if boxes.shape[1] < 9:
                boxes = np.concatenate([boxes[:, :7], np.zeros((len(boxes), 2))], axis=1)
            k = len(boxes)
            scores = _as_array(rec.get("scores_3d", np.ones(k))).astype(np.float64).reshape(-1)
            labels = _as_array(rec.get("labels_3d", np.full(k, -1))).astype(np.int64).reshape(-1)
            if len(scores) != k or len(labels) != k:
                raise ValueError(f"{where}: {k} boxes but {len(scores)} scores and {len(labels)} labels")
            clean.update(boxes_3d=np.nan_to_num(boxes[:, :9]), scores_3d=scores, labels_3d=labels)
        for key in ("masks_bev", "gt_masks_bev"):
            if key in rec and rec[key] is not None:
                masks = _as_array(rec[key]).astype(np.float32)
                if masks.ndim != 3 or masks.shape[0] != n_maps:
                    raise ValueError(f"{where}: {key} has shape {masks.shape}, expected ({n_maps}, X, Y) for "
                                     f"the map classes {list(base.map_classes)}")
                clean[key] = masks
        if token not in known:
            unknown.append(token)
            continue
        if token in out:
            log.warning("%s: sample %s appears twice; the last record is shown", source, token)
        out[token] = clean
    if records and not out:
        raise ValueError(f"{source}: none of its {len(records)} samples are in {base.ann_file} "
                         f"(results of another split or info file?)")
    if unknown:
        log.warning("%s: %d of %d records are for samples not in %s and are skipped (first: %s)", source,
                    len(unknown), len(records), base.ann_file, ", ".join(unknown[:3]))
    return out


def sample_scenes(dataset_root: str | os.PathLike, version: str | None) -> dict[str, tuple[str, str]] | None:
    """{sample token: (scene token, scene name)} from the dataset's `sample.json` and `scene.json`.

    Returns None when the tables are not there (info files without the dataset's metadata).
    """
    if not version:
        return None
    folder = os.path.join(os.fspath(dataset_root), version)
    try:
        with open(os.path.join(folder, "scene.json")) as f:
            scenes = {s["token"]: s["name"] for s in json.load(f)}
        with open(os.path.join(folder, "sample.json")) as f:
            samples = json.load(f)
    except (OSError, ValueError, KeyError):
        return None
    return {s["token"]: (s["scene_token"], scenes.get(s["scene_token"], s["scene_token"])) for s in samples}


def select_samples(dataset, scenes: Sequence[str] | None = None, tokens: Sequence[str] | None = None,
                   max_samples: int | None = None) -> tuple[list[int], dict[int, str | None]]:
    """Dataset indices to show, in time order, and the scene name of each (None when unknown).

    Args:
        scenes: scene names or tokens to keep (needs the dataset's tables); unknown names raise.
        tokens: keep only these samples (e.g. those with results).
        max_samples: keep the first n.
    """
    base = _base(dataset)
    table = sample_scenes(base.dataset_root, base.version)
    indices = list(range(len(base.data_infos)))
    if scenes:
        if table is None:
            raise ValueError(f"--scenes needs the scene tables {base.dataset_root}/{base.version}/"
                             "{scene,sample}.json, which are missing")
        wanted = set(scenes)
        present = {v for pair in table.values() for v in pair}
        missing = sorted(wanted - present)
        if missing:
            raise ValueError(f"scenes {missing} are not in {base.dataset_root} ({base.version})")
        indices = [i for i in indices if set(table.get(base.data_infos[i]["token"], ())) & wanted]
        if not indices:
            raise ValueError(f"no sample of {base.ann_file} belongs to the scenes {sorted(wanted)}")
    if tokens is not None:
        keep = set(tokens)
        indices = [i for i in indices if base.data_infos[i]["token"] in keep]
    if max_samples is not None:
        indices = indices[:max_samples]
    names = {i: (table.get(base.data_infos[i]["token"], (None, None))[1] if table else None) for i in indices}
    return indices, names


def _image_size(path: str) -> tuple[int, int]:
    from PIL import Image

    with Image.open(path) as im:
        return int(im.size[0]), int(im.size[1])


def _subsample(points: np.ndarray, max_points: int | None) -> np.ndarray:
    if max_points is None or len(points) <= max_points:
        return points
    idx = np.linspace(0, len(points) - 1, max_points).round().astype(np.int64)
    return points[idx]


def _names(labels: np.ndarray, classes: Sequence[str]) -> list[str]:
    return [classes[j] if 0 <= j < len(classes) else f"class_{j}" for j in labels.tolist()]


class MapRasteriser:
    """GT BEV masks (C, X, Y) from the map expansion over BEV_XBOUND / BEV_YBOUND.

    A location whose map cannot be read is reported once and then skipped (its frames get no GT map).
    """

    def __init__(self, dataset_root: str, classes: Sequence[str]):
        from bevfusion.datasets.transforms.bev_seg import LoadBEVSegmentation

        self.transform = LoadBEVSegmentation(dataset_root, BEV_XBOUND, BEV_YBOUND, classes)
        self.failed: set[str | None] = set()

    def __call__(self, data: dict[str, Any]) -> np.ndarray | None:
        location = data.get("location")
        if location in self.failed:
            return None
        try:
            keys = ("token", "location", "lidar2ego", "ego2global")
            return self.transform({k: data.get(k) for k in keys})["gt_masks_bev"]
        except (KeyError, FileNotFoundError, OSError, ValueError) as exc:
            log.warning("GT map masks of location %r are left out: %s", location, exc)
            self.failed.add(location)
            return None


def load_frame(dataset, index: int, result: Mapping[str, Any] | None = None,
               options: FrameOptions | None = None, scene: str | None = None,
               rasterise_map: Any = None) -> Frame:
    """Gather sample `index` of `dataset` (and its record from `load_results`, if any) for logging.

    A missing LiDAR, sweep or image file becomes a warning in `Frame.warnings` (also logged) and the
    item is left out (sweeps: keyframe only); the camera's calibration is kept, its image size then
    taken as twice the principal point.
    """
    options = options or FrameOptions()
    base = _base(dataset)
    data = base.get_data_info(index)
    info = base.data_infos[index]
    token = data["token"]
    warnings: list[str] = []

    points = None
    try:
        points = load_multisweep_points(info, base.dataset_root, sweeps_num=options.sweeps_num)
    except FileNotFoundError as exc:
        try:
            points = load_multisweep_points({**info, "sweeps": []}, base.dataset_root, sweeps_num=0)
            warnings.append(f"{exc}; showing the keyframe only")
        except FileNotFoundError as exc2:
            warnings.append(f"{exc2}; no LiDAR points")
    if points is not None:
        points = _subsample(points, options.max_points)

    cameras = []
    for k, name in enumerate(data["camera_names"]):
        K = data["camera_intrinsics"][k, :3, :3].copy()
        path = None
        if options.images:
            try:
                path = resolve_data_path(data["image_paths"][k], base.dataset_root, token)
            except FileNotFoundError as exc:
                warnings.append(f"{name}: {exc}")
        size = _image_size(path) if path else (int(round(2 * K[0, 2])), int(round(2 * K[1, 2])))
        cameras.append(CameraView(name, K, data["camera2lidar"][k].copy(), size, path))

    frame = Frame(index=index, token=token, timestamp_us=int(info["timestamp"]), scene=scene,
                  lidar2ego=data["lidar2ego"], ego2global=data["ego2global"], points=points, cameras=cameras,
                  warnings=warnings)
    if base.has_annotations(index):
        ann = base.get_ann_info(index)
        frame.gt_boxes = np.asarray(ann["gt_bboxes_3d"], dtype=np.float64).reshape(-1, 9)
        frame.gt_names = [str(n) for n in ann["gt_names"]]
    if result is not None:
        if "boxes_3d" in result:
            keep = result["scores_3d"] >= options.score_threshold
            frame.pred_boxes = result["boxes_3d"][keep]
            frame.pred_scores = result["scores_3d"][keep]
            frame.pred_names = _names(result["labels_3d"][keep], base.object_classes)
        frame.pred_masks = result.get("masks_bev")
        frame.gt_masks = result.get("gt_masks_bev")
    if frame.gt_masks is None and options.gt_maps and rasterise_map is not None:
        frame.gt_masks = rasterise_map(data)
    for w in warnings:
        log.warning("%s", w if token in w else f"sample {token}: {w}")
    return frame
